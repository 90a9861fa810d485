"""Training data memory: the splits sampled inside DuckDB against the whole training set read
into pandas and sampled there (how training and the backtest read it before), at growing
training sets; and what the backtest reads now (the features and labels of at most
MAX_ROWS_PER_CUTOFF customers per cutoff for every model, event sequences only for the
transformer's draws and one chunk of rows it scores).

The demo's marts.training_set (event sequences included) is replicated ``--copies`` times
into a scratch DuckDB file (each copy a new set of customers); each reader then runs in its
own process with the default config's caps (20,000 training, 5,000 validation and 3,000
holdout rows, 20,000 pretraining sequences), and its peak memory above what the process held
after its imports (VmHWM, reset after the imports; Linux) and time are reported, with the
ratio against the pandas reader on the same file.

    .venv/bin/python benchmarks/training_memory.py --warehouse data/warehouse.duckdb
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb

CHILD = """
import json, sys, time
from pathlib import Path
from ml.config import TrainConfig
from ml.backtest import MAX_ROWS_PER_CUTOFF
from ml.data import (SEQUENCE_COLUMN, TEXT_COLUMN, md5_sample, read_mart, read_per_cutoff,
                     read_sequences, read_training_data)
from ml.sequence import SequenceClassifier

source, how = Path(sys.argv[1]), sys.argv[2]
cfg = TrainConfig.load()
def rss(field):  # kB lines of /proc/self/status
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1]) / 1024
imports_mib = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to what is held now
start = time.perf_counter()
if how == "duckdb":
    data = read_training_data(source, cfg)
    rows = sum(len(f) for f in data.frames.values()) + len(data.pretrain_sequences)
elif how == "backtest":  # capped features per cutoff, sequences for the transformer's draws
    frame = read_per_cutoff(source, MAX_ROWS_PER_CUTOFF, cfg.seed,
                            without=(SEQUENCE_COLUMN, TEXT_COLUMN))
    train, validation, test = (frame[frame["split"] == n] for n in ("train", "validation", "test"))
    draws = [md5_sample(validation, cfg.pretrain_max_customers, f"pretrain:{cfg.seed}"),
             md5_sample(train, cfg.max_train_rows, cfg.seed, "value_tier"),
             md5_sample(validation, cfg.max_val_rows, cfg.seed, "value_tier"),
             test.iloc[: SequenceClassifier.PREDICT_CHUNK_ROWS]]
    held = [read_sequences(source, d["customer_cutoff_id"]) for d in draws]
    rows = len(frame) + sum(len(h) for h in held)
else:  # the whole mart in pandas, then sampled there
    frame = read_mart(source, "training_set")
    parts = []
    for name, cap in (("train", cfg.max_train_rows), ("validation", cfg.max_val_rows),
                      ("test", cfg.holdout_rows)):
        part = frame[frame["split"] == name]
        parts.append(part.sample(n=min(cap, len(part)), random_state=cfg.seed))
    every = frame.loc[frame["split"] == "validation", "event_sequence"]
    pretrain = every.sample(n=min(cfg.pretrain_max_customers, len(every)), random_state=cfg.seed)
    rows = sum(len(p) for p in parts) + len(pretrain)
peak = rss("VmHWM")
print(json.dumps({"seconds": time.perf_counter() - start, "rows": rows,
                  "read_mib": peak - imports_mib}))
"""


def replicate(warehouse: Path, copies: int, target: Path) -> int:
    with duckdb.connect(str(target)) as con:
        con.execute(f"attach '{warehouse}' as source (read_only)")
        con.execute("create schema marts")
        con.execute(
            "create table marts.training_set as "
            "select * replace (customer_cutoff_id || '-' || copy as customer_cutoff_id, "
            "customer_id || '-' || copy as customer_id) "
            f"from source.marts.training_set, range({copies}) as r(copy)"
        )
        return con.execute("select count(*) from marts.training_set").fetchone()[0]


def measure(source: Path, how: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(source), how],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    # DuckDB may draw its progress bar on stdout too: the result is the last JSON object.
    return json.loads(out.stdout[out.stdout.rindex('{"seconds"') :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warehouse", type=Path, default=Path("data/warehouse.duckdb"))
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 5, 10, 20])
    args = parser.parse_args()
    print("| training set rows | reader | memory to read (MiB) | seconds | memory ÷ pandas |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="valueloop-train-mem-") as tmp:
        for copies in args.copies:
            target = Path(tmp) / f"x{copies}.duckdb"
            rows = replicate(args.warehouse.resolve(), copies, target)
            whole = measure(target, "pandas")
            sampled = measure(target, "duckdb")
            backtest = measure(target, "backtest")
            for name, result in (
                ("whole mart in pandas", whole),
                ("sampled in DuckDB", sampled),
                ("backtest: features + drawn sequences", backtest),
            ):
                ratio = result["read_mib"] / whole["read_mib"]
                print(
                    f"| {rows:,} | {name} | {result['read_mib']:,.0f} | "
                    f"{result['seconds']:.1f} | {ratio:.2f} |",
                    flush=True,
                )
            target.unlink()


if __name__ == "__main__":
    main()
