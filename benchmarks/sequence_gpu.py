"""The behaviour-sequence transformer at scale, for a GPU: fine-tuning and CoLES pretraining
throughput (sequences/s, bf16 on CUDA) with the GPU's utilisation, and one full scoring pass
over ``--customers`` customers (JSON parsing included, in chunks as the scorer reads them).

It runs where the warehouse is not: a GPU machine gets a small extract, made here, and
replicates its rows to the size asked for (the same sequences repeated: throughput does not
depend on which customer a sequence belongs to). The text vectors travel in the extract, so
the GPU machine needs neither the warehouse nor the packaged MiniLM weights.

    # here: 30,000 rows of the demo's training set and its text vectors (a few MB)
    .venv/bin/python benchmarks/sequence_gpu.py extract --warehouse data/warehouse.duckdb \\
        --out .bench/extract
    # on the GPU machine (the device tool: carry .bench, and the duckdb wheel ml.data imports)
    python3 benchmarks/sequence_gpu.py measure --extract .bench/extract \\
        --config ml/configs/gpu.yaml --customers 1000000 --out gpu.json

    # does a larger fine-tuning batch cost accuracy? (a fifth of the customers held out)
    python3 benchmarks/sequence_gpu.py batch-quality --extract .bench/extract \\
        --config ml/configs/gpu.yaml --batch-sizes 64 256 512 --seeds 0 1

On a machine without CUDA it measures the CPU (fp32), at whatever size is asked for.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml import sequence
from ml.config import TrainConfig
from ml.data import SEQUENCE_COLUMN, FeatureScaler, md5_sample, numeric_columns

SCORE_CHUNK_ROWS = 50_000  # as SequenceClassifier.PREDICT_CHUNK_ROWS reads them


def extract(warehouse: Path, out: Path, rows: int) -> None:
    from ml.data import read_mart

    frame = read_mart(warehouse, "training_set")
    sample = md5_sample(frame, rows, 0)
    columns = ["customer_cutoff_id", "value_tier", "is_churned", SEQUENCE_COLUMN]
    out.mkdir(parents=True, exist_ok=True)
    sample[columns + numeric_columns(frame)].to_parquet(
        out / "rows.parquet", compression="zstd", index=False
    )
    cfg = TrainConfig.load()
    with tempfile.TemporaryDirectory() as cache:
        keys, vectors = sequence.embed_texts(
            sequence.read_texts(warehouse), cfg.text_encoder, Path(cache)
        )
    np.save(out / "text_vectors.npy", vectors)
    (out / "text_keys.json").write_text(json.dumps(keys))
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"{len(sample):,} rows and {len(keys):,} text vectors in {out} ({size:.1f} MiB)")


class GpuSampler:
    """nvidia-smi's utilisation and memory every half second while a stage runs."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._process = None
        self._thread = None

    def __enter__(self) -> GpuSampler:
        if torch.cuda.is_available() and shutil.which("nvidia-smi"):
            self._process = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "500",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._process.stdout:
            util, memory = (float(v) for v in line.split(","))
            self.samples.append((util, memory))

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_memory_max_mib": None}
        util = [u for u, _ in self.samples]
        return {
            "gpu_util_mean": round(float(np.mean(util)), 1),
            "gpu_memory_max_mib": max(m for _, m in self.samples),
        }


def _trainer(cfg, epochs: int) -> pl.Trainer:
    kwargs = {**sequence.trainer_kwargs(cfg), "enable_progress_bar": False}
    kwargs["deterministic"] = False  # throughput, not reproducibility
    return pl.Trainer(
        max_epochs=epochs, num_sanity_val_steps=0, enable_model_summary=False, **kwargs
    )


def measure(args: argparse.Namespace) -> dict:
    cfg = TrainConfig.load(args.config)
    if args.batch_size:
        cfg = replace(cfg, batch_size=args.batch_size)
    rows = pd.read_parquet(args.extract / "rows.parquet")
    keys = json.loads((args.extract / "text_keys.json").read_text())
    vectors = np.load(args.extract / "text_vectors.npy")
    frame = rows.iloc[np.resize(np.arange(len(rows)), args.customers)].reset_index(drop=True)
    scaler = FeatureScaler.fit(rows, [c for c in numeric_columns(rows)])
    vocab = sequence.SequenceVocab.fit(rows[SEQUENCE_COLUMN], keys, cfg.max_events)
    spec = sequence.spec_for(cfg, vocab, vectors.shape[1])
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    result: dict = {
        "device": device,
        "precision": sequence.trainer_kwargs(cfg)["precision"],
        "customers": args.customers,
        "model": f"{cfg.seq_layers} layers x {cfg.seq_hidden}, {cfg.max_events} events",
        "batch_size": cfg.batch_size,
        "pretrain_batch_size": cfg.pretrain_batch_size,
    }
    print(json.dumps(result), flush=True)
    torch.manual_seed(0)

    train = frame.head(args.train_rows or args.customers)
    start = time.perf_counter()
    dataset = sequence.labelled_dataset(train, vocab, scaler)
    result["fine_tune_parse_seconds"] = round(time.perf_counter() - start, 1)
    module = sequence.SequenceModel.from_config(
        cfg, spec, len(scaler.columns), [1.0, 1.0, 1.0], vectors
    )
    trainer = _trainer(cfg, 1)
    with GpuSampler() as gpu:
        start = time.perf_counter()
        trainer.fit(module, sequence.loader(dataset, cfg.batch_size, True, 0))
        seconds = time.perf_counter() - start
    result.update(
        fine_tune_rows=len(train),
        fine_tune_seconds=round(seconds, 1),
        fine_tune_sequences_per_s=round(len(train) / seconds),
        **{f"fine_tune_{k}": v for k, v in gpu.summary().items()},
    )
    print(json.dumps(result), flush=True)

    pre = frame.head(args.pretrain_rows or args.customers)
    events = sequence.parse_sequences(pre[SEQUENCE_COLUMN], vocab)
    learnt = int((events.lengths >= 2).sum())
    with GpuSampler() as gpu:
        start = time.perf_counter()
        sequence.pretrain(
            events,
            spec,
            vectors,
            replace(cfg, pretrain_epochs=1),
            {**sequence.trainer_kwargs(cfg), "enable_progress_bar": False, "deterministic": False},
        )
        seconds = time.perf_counter() - start
    result.update(
        pretrain_sequences=learnt,
        pretrain_seconds=round(seconds, 1),
        pretrain_sequences_per_s=round(learnt / seconds),
        **{f"pretrain_{k}": v for k, v in gpu.summary().items()},
    )
    print(json.dumps(result), flush=True)

    net = module.net.to("cuda" if cuda else "cpu")
    with GpuSampler() as gpu:
        start = time.perf_counter()
        scored = 0
        for first in range(0, len(frame), SCORE_CHUNK_ROWS):
            chunk = frame.iloc[first : first + SCORE_CHUNK_ROWS]
            _, churn, _ = sequence.predict_sequence_net(
                net, vocab, scaler, chunk, cfg.eval_batch_size
            )
            scored += len(churn)
        seconds = time.perf_counter() - start
    result.update(
        score_customers=scored,
        score_seconds=round(seconds, 1),
        score_sequences_per_s=round(scored / seconds),
        **{f"score_{k}": v for k, v in gpu.summary().items()},
    )
    return result


def batch_quality(args: argparse.Namespace) -> dict:
    """Does a larger fine-tuning batch cost accuracy? The same model, learning rates and epochs
    at each batch size, on the extract's rows split by customer (a fifth held out)."""
    from sklearn.metrics import f1_score, roc_auc_score

    cfg = TrainConfig.load(args.config)
    rows = pd.read_parquet(args.extract / "rows.parquet")
    keys = json.loads((args.extract / "text_keys.json").read_text())
    vectors = np.load(args.extract / "text_vectors.npy")
    customer = rows["customer_cutoff_id"].str.split("@").str[0]
    held = customer.map(lambda c: zlib.crc32(c.encode()) % 5 == 0).to_numpy()
    train, test = rows[~held].reset_index(drop=True), rows[held].reset_index(drop=True)
    scaler = FeatureScaler.fit(train, numeric_columns(train))
    vocab = sequence.SequenceVocab.fit(train[SEQUENCE_COLUMN], keys, cfg.max_events)
    spec = sequence.spec_for(cfg, vocab, vectors.shape[1])
    dataset = sequence.labelled_dataset(train, vocab, scaler)
    truth_tier = sequence.tier_index(test["value_tier"])
    result: dict = {"train_rows": len(train), "test_rows": len(test), "epochs": cfg.max_epochs}
    for batch_size in args.batch_sizes:
        for seed in args.seeds:
            torch.manual_seed(seed)
            module = sequence.SequenceModel.from_config(
                cfg, spec, len(scaler.columns), [1.0, 1.0, 1.0], vectors
            )
            trainer = _trainer(cfg, cfg.max_epochs)
            start = time.perf_counter()
            trainer.fit(module, sequence.loader(dataset, batch_size, True, seed))
            seconds = time.perf_counter() - start
            tiers, churn, _ = sequence.predict_sequence_net(
                module.net.to("cuda" if torch.cuda.is_available() else "cpu"),
                vocab,
                scaler,
                test,
                cfg.eval_batch_size,
            )
            result[f"batch_{batch_size}_seed_{seed}"] = {
                "churn_roc_auc": round(float(roc_auc_score(test["is_churned"], churn)), 4),
                "tier_macro_f1": round(
                    float(f1_score(truth_tier, tiers.argmax(1), average="macro")), 4
                ),
                "fit_seconds": round(seconds, 1),
            }
            print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("extract", help="write the rows and text vectors a GPU machine reads")
    p.add_argument("--warehouse", type=Path, default=Path("data/warehouse.duckdb"))
    p.add_argument("--out", type=Path, default=Path(".bench/extract"))
    p.add_argument("--rows", type=int, default=30_000)
    p = sub.add_parser("measure", help="time fine-tuning, pretraining and scoring")
    p.add_argument("--extract", type=Path, default=Path(".bench/extract"))
    p.add_argument("--config", type=Path, default=None, help="default: ml/configs/default.yaml")
    p.add_argument("--customers", type=int, default=1_000_000)
    p.add_argument("--train-rows", type=int, default=None, help="default: every customer")
    p.add_argument("--pretrain-rows", type=int, default=None, help="default: every customer")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    p = sub.add_parser("batch-quality", help="accuracy of fine-tuning at several batch sizes")
    p.add_argument("--extract", type=Path, default=Path(".bench/extract"))
    p.add_argument("--config", type=Path, default=None, help="default: ml/configs/default.yaml")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args()
    if args.action == "extract":
        extract(args.warehouse, args.out, args.rows)
        return
    result = measure(args) if args.action == "measure" else batch_quality(args)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
