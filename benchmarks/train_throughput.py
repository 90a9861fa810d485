"""Training throughput (samples/s): our LightningModule under pl.Trainer vs a plain PyTorch loop.

Same net, same data (the demo shop's training set), same batch size, optimiser and loss; each
side runs warm-up steps, then timed steps. Run on an idle machine:

    .venv/bin/python benchmarks/train_throughput.py --warehouse data/warehouse.duckdb

Prints a Markdown table for BENCHMARKS.md (ratio = Lightning / plain loop).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from ml.config import TrainConfig
from ml.data import CustomerDataModule, load_splits
from ml.model import CustomerModel, load_tokenizer


class StepTimer(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.samples = warmup, 0.0, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and not self.start:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.start:
            self.samples += batch["tier"].shape[0]


def build(cfg: TrainConfig, warehouse: Path, rows: int):
    frames, scaler = load_splits(
        replace(cfg, max_train_rows=rows, max_val_rows=64, holdout_rows=64), warehouse
    )
    tokenizer = load_tokenizer(cfg.encoder)
    data = CustomerDataModule.from_config(
        frames, tokenizer, scaler, cfg, Path("/tmp/valueloop-bench-cache")
    )
    data.prepare_data()
    data.setup("fit")

    def module() -> CustomerModel:
        pl.seed_everything(cfg.seed)
        return CustomerModel.from_config(cfg, tokenizer.vocab_size, len(scaler.columns))

    return data, module


def lightning_rate(data, make_module, warmup: int, steps: int) -> float:
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(make_module(), data.train_dataloader())
    return timer.samples / (time.perf_counter() - timer.start)


def plain_rate(data, make_module, warmup: int, steps: int) -> float:
    module = make_module()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module.to(device).train()
    optimiser = module.configure_optimizers()
    samples, start, step = 0, 0.0, 0
    while step < warmup + steps:
        for batch in data.train_dataloader():
            if step == warmup:
                start = time.perf_counter()
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, _ = module.compute_loss(batch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if step >= warmup:
                samples += batch["tier"].shape[0]
            step += 1
            if step >= warmup + steps:
                break
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warehouse", type=Path, default=Path("data/warehouse.duckdb"))
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cfg = TrainConfig.load(args.config)
    data, make_module = build(cfg, args.warehouse, args.rows)
    plain = plain_rate(data, make_module, args.warmup, args.steps)
    lightning = lightning_rate(data, make_module, args.warmup, args.steps)
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else (f"CPU, {torch.get_num_threads()} threads")
    )
    print(
        f"| encoder | device | batch | plain loop (samples/s) | Lightning (samples/s) "
        f"| ratio |\n|---|---|---|---|---|---|\n| {cfg.encoder} (top {cfg.trainable_layers}"
        f" layers trained) | {device} | {cfg.batch_size} | {plain:.1f} | {lightning:.1f} "
        f"| {lightning / plain:.2f} |"
    )


if __name__ == "__main__":
    main()
