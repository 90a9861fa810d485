"""Scoring throughput and memory.

1. Throughput (customers/s): our batched scorer (length-sorted dynamic padding, inference
   mode) against a naive per-row loop (tokenise and run one customer at a time, as a per-row
   Hugging Face pipeline does), same net, same rows.
2. Peak memory of streaming a scoring set of 100k and of 1M customers through the scorer in
   chunks (a scoring set replicated from the demo's), each in its own process.

    .venv/bin/python benchmarks/score_throughput.py --warehouse data/warehouse.duckdb

On a 2-core CPU, MiniLM scores about 60 customers/s, so 1M customers would take hours: the
memory runs use the tiny random encoder (same code path, smaller matrices) unless --encoder
says otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
import duckdb, numpy as np, pyarrow as pa, torch
from ml.data import FeatureScaler, numeric_columns, read_mart, to_model_input
from ml.model import CustomerNet, load_encoder, load_tokenizer
from ml.predict import predict_net

warehouse, encoder, copies, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), 20_000
base = read_mart(__import__("pathlib").Path(warehouse), "scoring_set")
scaler = FeatureScaler.fit(base, numeric_columns(base))
tokenizer = load_tokenizer(encoder)
torch.manual_seed(0)
net = CustomerNet(load_encoder(encoder, tokenizer.vocab_size), len(scaler.columns), 64, 0.0)
con = duckdb.connect()
con.register("base", pa.Table.from_pandas(base))
con.execute(f"create table scoring_set as select * replace (customer_id || '-' || copy as "
            f"customer_id) from base, range({copies}) as c(copy)")
total = con.execute("select count(*) from scoring_set").fetchall()[0][0]
start, done = time.perf_counter(), 0
embeddings = np.lib.format.open_memmap("/tmp/valueloop-bench-emb.npy", mode="w+",
                                       dtype="float32", shape=(total, 64))
for batch in con.sql("select * from scoring_set").to_arrow_reader(chunk):
    frame = to_model_input(batch.to_pandas())
    _, _, emb = predict_net(net, tokenizer, scaler, frame, 128, 512)
    embeddings[done: done + len(frame)] = emb
    done += len(frame)
print(json.dumps({"customers": done, "seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def throughput(warehouse: Path, encoder: str, rows: int, naive_rows: int) -> tuple[float, float]:
    import torch

    from ml.data import FeatureScaler, numeric_columns, read_mart, to_model_input
    from ml.model import CustomerNet, load_encoder, load_tokenizer
    from ml.predict import predict_net

    frame = read_mart(warehouse, "scoring_set")
    scaler = FeatureScaler.fit(frame, numeric_columns(frame))
    frame = to_model_input(frame.head(rows))
    tokenizer = load_tokenizer(encoder)
    torch.manual_seed(0)
    net = CustomerNet(load_encoder(encoder, tokenizer.vocab_size), len(scaler.columns), 64, 0.0)
    predict_net(net, tokenizer, scaler, frame.head(64), 128)  # warm-up
    start = time.perf_counter()
    predict_net(net, tokenizer, scaler, frame, 128, batch_size=256)
    batched = len(frame) / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(naive_rows):  # one customer at a time, as a per-row pipeline does
        predict_net(net, tokenizer, scaler, frame.iloc[i : i + 1], 128, batch_size=1)
    naive = naive_rows / (time.perf_counter() - start)
    return batched, naive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warehouse", type=Path, default=Path("data/warehouse.duckdb"))
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--naive-rows", type=int, default=128)
    parser.add_argument("--memory-encoder", default="tiny-random")
    parser.add_argument(
        "--sizes", default="100000,1000000", help="comma-separated numbers of customers to stream"
    )
    args = parser.parse_args()
    batched, naive = throughput(args.warehouse, args.encoder, args.rows, args.naive_rows)
    print(
        f"| encoder | batched, length-sorted (customers/s) | per-row (customers/s) | ratio |"
        f"\n|---|---|---|---|\n| {args.encoder} | {batched:.1f} | {naive:.1f} | "
        f"{batched / naive:.1f} |\n"
    )
    import duckdb

    with duckdb.connect(str(args.warehouse), read_only=True) as con:
        base = con.execute("select count(*) from marts.scoring_set").fetchall()[0][0]
    rows = []
    for target in (int(n) for n in args.sizes.split(",")):
        copies = -(-target // base)
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.warehouse), args.memory_encoder, str(copies)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(
        f"| customers streamed ({args.memory_encoder}) | time | customers/s | peak RSS |"
        f"\n|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['customers']:,} | {r['seconds']:.0f} s | {r['customers'] / r['seconds']:.0f}"
            f" | {r['peak_rss_mb']:.0f} MB |"
        )
    print(
        f"\npeak RSS ratio, largest / smallest: "
        f"{rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}"
    )


if __name__ == "__main__":
    main()
