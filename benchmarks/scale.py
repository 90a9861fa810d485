"""Scale: generate, ingest and validate (raw checkpoint) a small and a large demo shop.

Each step runs in its own process; wall time and peak RSS are measured per step. The small
shop is the baseline of the same run, so the ratios show how cost grows with size (time should
grow about linearly; memory should stay bounded). A pandas load of the large order-lines table,
what validating in pandas would need first, is the memory baseline of the raw checkpoint.

    .venv/bin/python benchmarks/scale.py --small 100000 --large 1000000 --work /tmp/vl-scale
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
start = time.perf_counter()
exec(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(code: str, env: dict[str, str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_size(customers: int, work: Path) -> dict[str, dict]:
    home = work / f"home-{customers}"
    shutil.rmtree(home, ignore_errors=True)
    env = {**os.environ, "VALUELOOP_HOME": str(home)}
    steps = {
        "generate": "from valueloop import jobs; from valueloop.config import load_settings; "
        f"jobs.generate_demo(load_settings(), {customers}, 1)",
        "ingest": "from valueloop import jobs; from valueloop.config import load_settings; "
        "s = load_settings(); jobs.ingest_path(s, s.demo_dir, 'simulator')",
        "raw checkpoint": "from valueloop.config import load_settings; "
        "from valueloop.quality.runner import run_checkpoint; "
        "run_checkpoint(load_settings(), 'raw')",
        "pandas load of raw.order_lines (baseline)": "import duckdb; "
        "from valueloop.config import load_settings; "
        "con = duckdb.connect(str(load_settings().warehouse_path), read_only=True); "
        "frame = con.execute('select * from raw.order_lines').df(); print(len(frame))",
    }
    return {name: measure(code, env) for name, code in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/valueloop-scale"))
    args = parser.parse_args()
    started = time.perf_counter()
    small, large = run_size(args.small, args.work), run_size(args.large, args.work)
    print(
        f"| step | {args.small:,} customers | {args.large:,} customers | time ratio "
        f"| peak RSS ratio |\n|---|---|---|---|---|"
    )
    for step in small:
        s, g = small[step], large[step]
        print(
            f"| {step} | {s['seconds']:.1f} s, {s['peak_rss_mb']:.0f} MB | {g['seconds']:.1f} s,"
            f" {g['peak_rss_mb']:.0f} MB | {g['seconds'] / s['seconds']:.1f} | "
            f"{g['peak_rss_mb'] / s['peak_rss_mb']:.2f} |"
        )
    check, pandas = large["raw checkpoint"], large["pandas load of raw.order_lines (baseline)"]
    print(
        f"\nraw checkpoint at {args.large:,} customers: peak RSS "
        f"{check['peak_rss_mb'] / pandas['peak_rss_mb']:.2f}x of a pandas load of the table "
        f"(total benchmark time {time.perf_counter() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
