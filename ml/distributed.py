"""Data-parallel fine-tuning, proven on CPU: Lightning's DDP over gloo with N processes.

    python -m ml.distributed --warehouse data/warehouse.duckdb --config ml/configs/tiny.yaml \\
        --devices 2 --out /tmp/ddp.json

The same fine-tuning as ``valueloop train`` (same DataModule, LightningModule and Trainer
settings, ``ml.train.make_trainer``) with ``strategy="ddp"``: Lightning starts the other ranks
by re-running this module, each trains on its shard of the batches, gradients are averaged
over gloo (NCCL on GPUs), and the validation metrics are synchronised across ranks. Rank 0
writes what the run produced, so a single-process run can be compared with it. On a
multi-GPU node the same code runs with ``accelerator: gpu`` and ``devices`` = GPUs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytorch_lightning as pl

from ml.config import DEFAULT_CONFIG, TrainConfig
from ml.data import CustomerDataModule, load_splits
from ml.model import CustomerModel, load_tokenizer
from ml.train import make_trainer


def fit(cfg: TrainConfig, source: Path, work: Path) -> dict | None:
    """Fine-tune per ``cfg``; returns the run's summary on rank 0, None on the other ranks."""
    pl.seed_everything(cfg.seed, workers=True)
    frames, scaler = load_splits(cfg, source)
    tokenizer = load_tokenizer(cfg.encoder)
    data = CustomerDataModule.from_config(frames, tokenizer, scaler, cfg, work / "cache")
    module = CustomerModel.from_config(cfg, tokenizer.vocab_size, len(scaler.columns))
    trainer = make_trainer(cfg, False, work / "checkpoints")
    trainer.fit(module, datamodule=data)
    if not trainer.is_global_zero:
        return None
    return {
        "strategy": type(trainer.strategy).__name__,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "train_batches_per_process": trainer.num_training_batches,
        "metrics": {k: float(v) for k, v in sorted(trainer.callback_metrics.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warehouse", type=Path, required=True, help="warehouse or snapshot")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--out", type=Path, required=True, help="JSON summary (rank 0)")
    args = parser.parse_args()
    cfg = TrainConfig.load(
        args.config, strategy=args.strategy, devices=args.devices, accelerator=args.accelerator
    )
    summary = fit(cfg, args.warehouse, args.out.parent / f"{args.out.stem}-work")
    if summary is not None:
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
