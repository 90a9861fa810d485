"""Sequences per second, training and scoring on this machine: the behaviour-sequence
transformer (ml/sequence.py) against the document transformer (ml/model.py) on the same
customers, each with the settings of ml/configs/default.yaml. The baseline is the document
model, measured in the same run.

Training: one Lightning epoch over the same ``--rows`` training rows (no warm-up: the epoch
includes the first steps), batch size from the config; CoLES pretraining timed separately, on
the same rows' sequences with at least two events (what it learns from), all on the CPU.
Scoring: each model's batch prediction (what the registered pyfunc runs) over the same rows.
Text embeddings and tokens are computed before the clocks start (both are cached in a run).

    .venv/bin/python benchmarks/sequence_throughput.py --warehouse data/warehouse.duckdb

Prints a Markdown table for BENCHMARKS.md (ratio = sequence / document).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch

from ml import sequence
from ml.config import TrainConfig
from ml.data import CustomerDataModule, FeatureScaler, numeric_columns, read_mart
from ml.model import CustomerModel, load_tokenizer
from ml.predict import predict_net


def _fit_seconds(module, loader) -> float:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warehouse", type=Path, default=Path("data/warehouse.duckdb"))
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--score-rows", type=int, default=5000)
    args = parser.parse_args()
    cfg = replace(TrainConfig.load(), accelerator="cpu")
    frame = read_mart(args.warehouse, "training_set")
    train = frame[frame["split"] == "train"].sample(n=args.rows, random_state=0)
    scored = frame.sample(n=min(args.score_rows, len(frame)), random_state=1)
    scaler = FeatureScaler.fit(train, numeric_columns(frame))
    cache = Path(tempfile.mkdtemp(prefix="valueloop-seq-bench-"))
    torch.manual_seed(0)

    # Sequence model.
    keys, vectors = sequence.embed_texts(
        sequence.read_texts(args.warehouse), cfg.text_encoder, cache
    )
    vocab = sequence.SequenceVocab.fit(train[sequence.SEQUENCE_COLUMN], keys, cfg.max_events)
    spec = sequence.spec_for(cfg, vocab, vectors.shape[1])
    events = sequence.parse_sequences(train[sequence.SEQUENCE_COLUMN], vocab)
    start = time.perf_counter()
    sequence.pretrain(
        events,
        spec,
        vectors,
        replace(cfg, pretrain_epochs=1),
        {**sequence.trainer_kwargs(cfg), "accelerator": "cpu", "enable_progress_bar": False},
    )
    pretrain_seconds = time.perf_counter() - start
    module = sequence.SequenceModel.from_config(
        cfg, spec, len(scaler.columns), [1.0, 1.0, 1.0], vectors
    )
    dataset = sequence.labelled_dataset(train, vocab, scaler)
    seq_train = _fit_seconds(module, sequence.loader(dataset, cfg.batch_size, True, 0))
    start = time.perf_counter()
    sequence.predict_sequence_net(module.net.eval(), vocab, scaler, scored, cfg.eval_batch_size)
    seq_score = time.perf_counter() - start

    # Document model, the same rows.
    tokenizer = load_tokenizer(cfg.encoder)
    data = CustomerDataModule.from_config(
        {"train": train, "validation": train.head(64), "test": train.head(64)},
        tokenizer,
        scaler,
        cfg,
        cache,
    )
    data.prepare_data()
    data.setup("fit")
    document = CustomerModel.from_config(cfg, tokenizer.vocab_size, len(scaler.columns))
    doc_train = _fit_seconds(document, data.train_dataloader())
    start = time.perf_counter()
    predict_net(document.net, tokenizer, scaler, scored, cfg.max_length, cfg.eval_batch_size)
    doc_score = time.perf_counter() - start

    rows, n_scored = len(train), len(scored)
    print(f"{rows} training rows, {n_scored} scored rows, {torch.get_num_threads()} threads")
    print("| stage | sequence transformer | document transformer | ratio |")
    print("|---|---|---|---|")
    print(
        f"| fine-tuning, sequences/s | {rows / seq_train:,.0f} | {rows / doc_train:,.0f} | "
        f"{doc_train / seq_train:.1f}× |"
    )
    print(
        f"| scoring, sequences/s | {n_scored / seq_score:,.0f} | {n_scored / doc_score:,.0f} | "
        f"{doc_score / seq_score:.1f}× |"
    )
    learnt = int((events.lengths >= 2).sum())
    print(f"| CoLES pretraining, sequences/s | {learnt / pretrain_seconds:,.0f} | – | – |")


if __name__ == "__main__":
    main()
