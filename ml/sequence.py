"""The behaviour-sequence transformer: each customer as the sequence of their latest events.

Input: ``event_sequence`` (``marts.customer_event_sequences``, joined into the training and
scoring sets), a JSON object of equal-length lists, oldest event first: kind, days before the
cutoff, amount, quantity, lines, rating, category and up to three text keys (product
descriptions or the review text, ``marts.event_texts``). Each event becomes one vector: its
numbers (log-scaled, plus the gap to the previous event), a kind embedding, a category
embedding and the mean of its texts' sentence embeddings (the packaged MiniLM, each distinct
text embedded once and cached on disk by key, :func:`embed_texts`). The vectors go into a
BERT-style encoder as ``inputs_embeds`` behind a learned summary token, newest event first;
the summary token's output is fused with the static features' numeric tower into the tier and
churn heads (the same heads and losses as the document model, ``ml.model``).

Pretraining (:class:`CoLESModule`): contrastive learning on sub-sequences of the same
customer (CoLES, Babaev et al., SIGMOD 2022): two random contiguous slices of each customer's
sequence are pulled together and pushed away from other customers' slices (InfoNCE). It needs
no labels, so it runs on every customer's history before the cutoff.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ml.data import (
    SEQUENCE_COLUMN,
    TIERS,
    FeatureScaler,
    md5_sample,
    read_sequences,
    tier_index,
)
from ml.evaluate import fit_tier_weights, published_tiers
from ml.model import TINY_RANDOM, TwoHeadModule, packaged_minilm

log = logging.getLogger(__name__)

KINDS = ("order", "return", "cancellation", "review")  # index 0 is padding
EVENT_NUMBERS = ("days_before", "gap_days", "amount", "quantity", "lines", "rating")
TEXTS_PER_EVENT = 3
# Bumped whenever the encoder or the pretraining changes, so that no cached encoder pretrained
# by older code is reused.
PRETRAIN_VERSION = 2


# ---------------------------------------------------------------------------------------------
# Text embeddings: every distinct text once, cached on disk by key.


def read_texts(source: Path) -> pd.DataFrame:
    """``marts.event_texts`` from the warehouse (read-only) or a training snapshot folder."""
    if source.is_dir():
        path = source / "event_texts.parquet"
        if not path.exists():
            return pd.DataFrame({"text_key": [], "text": []})
        return pd.read_parquet(path, columns=["text_key", "event_text"]).rename(
            columns={"event_text": "text"}
        )
    with duckdb.connect(str(source), read_only=True) as con:
        return con.execute(
            "select text_key, event_text as text from marts.event_texts order by text_key"
        ).df()


def _sentence_encoder(name: str):
    from transformers import AutoModel, AutoTokenizer, BertConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm()))
    if name == TINY_RANDOM:
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
        return tokenizer, AutoModel.from_config(config).eval()
    source = packaged_minilm() if name == "minilm" else name
    return tokenizer, AutoModel.from_pretrained(str(source)).eval()


def embed_texts(
    texts: pd.DataFrame, encoder: str, cache_dir: Path, batch_size: int = 128
) -> tuple[list[str], np.ndarray]:
    """Keys and unit-length sentence embeddings (mean pooling, as all-MiniLM-L6-v2 is used)
    of every text; only texts not in the cache are encoded, and the cache grows by them."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(encoder.encode()).hexdigest()[:12]
    cache = cache_dir / f"text-embeddings-{tag}.parquet"
    known = pd.read_parquet(cache) if cache.exists() else pd.DataFrame({"text_key": [], "v": []})
    missing = texts[~texts["text_key"].isin(set(known["text_key"]))]
    if len(missing):
        tokenizer, model = _sentence_encoder(encoder)
        vectors = []
        rows = missing["text"].fillna("").tolist()
        starts = range(0, len(rows), batch_size)
        with torch.inference_mode():
            for start in tqdm(starts, desc="embed texts", unit="batch", disable=len(starts) < 4):
                batch = tokenizer(
                    rows[start : start + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=64,
                    return_tensors="pt",
                )
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                vectors.append(F.normalize(pooled, dim=-1).numpy())
        fresh = pd.DataFrame(
            {"text_key": missing["text_key"].tolist(), "v": list(np.concatenate(vectors))}
        )
        known = pd.concat([known, fresh], ignore_index=True) if len(known) else fresh
        partial = cache.with_suffix(".partial")
        known.to_parquet(partial, index=False)
        partial.replace(cache)
        log.info("embedded %d new texts with %s (cache %s)", len(missing), encoder, cache)
    wanted = known[known["text_key"].isin(set(texts["text_key"]))]
    if wanted.empty:  # a shop without product descriptions or reviews
        return [], np.zeros((0, 1), dtype="float32")
    return wanted["text_key"].tolist(), np.stack(wanted["v"].to_numpy()).astype("float32")


# ---------------------------------------------------------------------------------------------
# Vocabulary and parsing: JSON sequences to padded arrays, newest event first.


@dataclass
class SequenceVocab:
    """What the event layer indexes: categories seen in training, and the embedded texts."""

    categories: list[str]  # index + 2 (0 padding, 1 unknown)
    text_keys: list[str]  # index + 1 (0: no text or a text unknown at training)
    max_events: int

    @classmethod
    def fit(cls, sequences: pd.Series, text_keys: list[str], max_events: int) -> SequenceVocab:
        seen: set[str] = set()
        for raw in sequences:
            seen.update(json.loads(raw).get("category", []))
        return cls(sorted(seen), list(text_keys), max_events)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SequenceVocab:
        return cls(**json.loads(text))


@dataclass
class EventArrays:
    """Padded to max_events, newest event at position 0."""

    numbers: np.ndarray  # (n, L, len(EVENT_NUMBERS)) float32
    kinds: np.ndarray  # (n, L) int64, 0 = padding
    categories: np.ndarray  # (n, L) int64
    texts: np.ndarray  # (n, L, TEXTS_PER_EVENT) int64, 0 = none
    lengths: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, index) -> EventArrays:
        return EventArrays(
            self.numbers[index],
            self.kinds[index],
            self.categories[index],
            self.texts[index],
            self.lengths[index],
        )


def _signed_log(values: np.ndarray) -> np.ndarray:
    return np.sign(values) * np.log1p(np.abs(values))


def parse_sequences(sequences: pd.Series, vocab: SequenceVocab) -> EventArrays:
    """JSON event sequences (oldest first) to arrays, keeping the newest max_events."""
    n, width = len(sequences), vocab.max_events
    numbers = np.zeros((n, width, len(EVENT_NUMBERS)), dtype="float32")
    kinds = np.zeros((n, width), dtype="int64")
    categories = np.zeros((n, width), dtype="int64")
    texts = np.zeros((n, width, TEXTS_PER_EVENT), dtype="int64")
    lengths = np.zeros(n, dtype="int64")
    kind_index = {k: i + 1 for i, k in enumerate(KINDS)}
    category_index = {c: i + 2 for i, c in enumerate(vocab.categories)}
    text_index = {k: i + 1 for i, k in enumerate(vocab.text_keys)}
    for row, raw in enumerate(sequences):
        events = json.loads(raw) if raw else {}
        if not events.get("kind"):
            continue
        every = np.asarray(events["days_before"], dtype="float64")[::-1]
        days = every[:width]
        size = len(days)
        lengths[row] = size
        # The previous event's days_before, newest first, taken before the cut so that the
        # oldest kept event still has its gap.
        older = np.append(every[1:], np.nan)[:size]
        gaps = np.nan_to_num(older - days, nan=0.0)
        numbers[row, :size] = np.stack(
            [
                np.log1p(np.clip(days, 0, None)),
                np.log1p(np.clip(gaps, 0, None)),
                _signed_log(np.asarray(events["amount"], dtype="float64")[::-1][:size]),
                np.log1p(np.abs(np.asarray(events["quantity"], dtype="float64")[::-1][:size])),
                np.log1p(np.asarray(events["lines"], dtype="float64")[::-1][:size]),
                np.asarray(events["rating"], dtype="float64")[::-1][:size] / 5.0,
            ],
            axis=-1,
        )
        kinds[row, :size] = [kind_index.get(k, 0) for k in events["kind"][::-1][:size]]
        categories[row, :size] = [category_index.get(c, 1) for c in events["category"][::-1][:size]]
        for position, keys in enumerate(events["texts"][::-1][:size]):
            for slot, key in enumerate((keys or [])[:TEXTS_PER_EVENT]):
                texts[row, position, slot] = text_index.get(key, 0)
    return EventArrays(numbers, kinds, categories, texts, lengths)


def stable_seed(text: str) -> int:
    return zlib.crc32(text.encode())


# ---------------------------------------------------------------------------------------------
# The net.


@dataclass(frozen=True)
class SequenceSpec:
    """The sequence encoder's architecture (saved with the model)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    max_events: int = 32
    n_categories: int = 0
    n_texts: int = 0
    text_dim: int = 384
    dropout: float = 0.1


def text_table(vectors: np.ndarray | None, n_texts: int, dim: int | None = None) -> np.ndarray:
    """The encoder's text table: row 0 is "no text", then one row per known text."""
    width = dim if dim is not None else (vectors.shape[1] if vectors is not None else 1)
    table = np.zeros((n_texts + 1, width), dtype="float32")
    if vectors is not None and len(vectors):
        table[1:] = vectors
    return table


class EventEncoder(nn.Module):
    """Event vectors into a BERT encoder (``inputs_embeds``) behind a learned summary token;
    returns the mean of the outputs over the summary token and the events."""

    def __init__(self, spec: SequenceSpec, text_vectors: np.ndarray | None = None) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        hidden = spec.hidden
        self.numbers = nn.Linear(len(EVENT_NUMBERS), hidden)
        self.kind = nn.Embedding(len(KINDS) + 1, hidden, padding_idx=0)
        self.category = nn.Embedding(spec.n_categories + 2, hidden, padding_idx=0)
        # The sentence embeddings are fixed inputs (saved with the model, not trained).
        self.register_buffer(
            "text_vectors", torch.as_tensor(text_table(text_vectors, spec.n_texts, spec.text_dim))
        )
        self.text = nn.Linear(spec.text_dim, hidden)
        self.summary = nn.Parameter(torch.zeros(1, 1, hidden))
        nn.init.normal_(self.summary, std=0.02)
        config = BertConfig(
            vocab_size=2,
            hidden_size=hidden,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            intermediate_size=4 * hidden,
            hidden_dropout_prob=spec.dropout,
            attention_probs_dropout_prob=spec.dropout,
            max_position_embeddings=spec.max_events + 1,
        )
        self.bert = BertModel(config, add_pooling_layer=False)
        self.hidden = hidden

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One vector per event (batch, events, hidden): the encoder's input."""
        texts = batch["texts"]
        present = (texts > 0).unsqueeze(-1).to(self.text_vectors.dtype)
        text = (self.text_vectors[texts] * present).sum(2) / present.sum(2).clamp(min=1.0)
        return (
            self.numbers(batch["numbers"])
            + self.kind(batch["kinds"])
            + self.category(batch["categories"])
            + self.text(text)
        )

    def encode(self, events: torch.Tensor, event_mask: torch.Tensor) -> torch.Tensor:
        size = events.shape[0]
        embeds = torch.cat([self.summary.expand(size, -1, -1).to(events.dtype), events], 1)
        mask = torch.cat(
            [torch.ones(size, 1, dtype=torch.long, device=events.device), event_mask], 1
        )
        hidden = self.bert(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        # Mean over the summary token and the events: every event's own residual stream
        # reaches the representation from the first step (the summary token alone starts out
        # nearly the same for everyone, which stalls contrastive pretraining).
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encode(self.embed(batch), batch["mask"])


class SequenceNet(nn.Module):
    """Event encoder + numeric tower -> fused embedding -> tier and churn heads."""

    def __init__(
        self,
        spec: SequenceSpec,
        n_numeric: int,
        fused_dim: int,
        text_vectors: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.encoder = EventEncoder(spec, text_vectors)
        self.numeric_tower = nn.Sequential(
            nn.Linear(n_numeric, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU()
        )
        self.fusion = nn.Sequential(
            nn.Linear(spec.hidden + 64, fused_dim), nn.GELU(), nn.Dropout(spec.dropout)
        )
        self.tier_head = nn.Linear(fused_dim, len(TIERS))
        self.churn_head = nn.Linear(fused_dim, 1)
        # Platt scaling of the churn logit, fitted on the validation cutoff after fine-tuning
        # (:func:`calibrate_churn`); the identity until then.
        self.register_buffer("churn_scale", torch.ones(()))
        self.register_buffer("churn_shift", torch.zeros(()))
        # Tier decision weights for macro-F1, fitted on the validation cutoff (ml.evaluate).
        self.register_buffer("tier_decision", torch.ones(len(TIERS)))
        # 1 once fitted to publish coherent tiers (``ml.evaluate.published_tiers``: p_lapsed is
        # the churn probability); 0 in a net saved before coherent tiers, which publishes its
        # tier head's.
        self.register_buffer("coherent", torch.zeros(()))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.heads(self.encoder(batch), batch["numeric"])

    def heads(self, summary: torch.Tensor, numeric: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fused embedding and both heads from the encoded sequence and the features."""
        numeric = self.numeric_tower(numeric.to(summary.dtype))
        fused = self.fusion(torch.cat([summary, numeric], -1))
        return {
            "tier_logits": self.tier_head(fused),
            "churn_logit": self.churn_head(fused).squeeze(-1) * self.churn_scale + self.churn_shift,
            "embedding": fused,
        }


def calibrate_churn(
    net: SequenceNet, vocab: SequenceVocab, scaler: FeatureScaler, validation: pd.DataFrame
) -> tuple[float, float]:
    """Platt scaling on the validation cutoff: the churn logit's scale and shift that make
    "0.3" read as three in ten. Returns the validation ECE before and after."""
    from sklearn.linear_model import LogisticRegression

    from ml.evaluate import expected_calibration_error

    _, churn, _ = predict_sequence_net(net, vocab, scaler, validation)
    labels = validation["is_churned"].to_numpy(dtype=int)
    before = expected_calibration_error(labels, churn)
    p = np.clip(churn.astype("float64"), 1e-6, 1 - 1e-6)
    logit = np.log(p / (1 - p))
    platt = LogisticRegression(C=1e6).fit(logit[:, None], labels)
    a, b = float(platt.coef_[0, 0]), float(platt.intercept_[0])
    with torch.no_grad():
        net.churn_shift.copy_(net.churn_shift * a + b)
        net.churn_scale.mul_(a)
    _, churn, _ = predict_sequence_net(net, vocab, scaler, validation)
    return before, expected_calibration_error(labels, churn)


# ---------------------------------------------------------------------------------------------
# Datasets and batches.


class SequenceDataset(Dataset):
    def __init__(
        self,
        events: EventArrays,
        numeric: np.ndarray | None = None,
        tiers: np.ndarray | None = None,
        churn: np.ndarray | None = None,
    ) -> None:
        self.events, self.numeric, self.tiers, self.churn = events, numeric, tiers, churn

    def __len__(self) -> int:
        return len(self.events)

    def __getitem__(self, index: int) -> int:
        return index

    def batch(self, rows: list[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Rows to tensors, trimmed to the batch's longest sequence."""
        rows = np.asarray(rows)
        part = self.events.take(rows)
        width = max(int(part.lengths.max(initial=0)), 1)
        out = {
            "numbers": torch.from_numpy(part.numbers[:, :width]),
            "kinds": torch.from_numpy(part.kinds[:, :width]),
            "categories": torch.from_numpy(part.categories[:, :width]),
            "texts": torch.from_numpy(part.texts[:, :width]),
            "mask": torch.from_numpy(part.kinds[:, :width] > 0).long(),
        }
        if self.numeric is not None:
            out["numeric"] = torch.from_numpy(self.numeric[rows])
        if self.tiers is not None:
            out["tier"] = torch.from_numpy(self.tiers[rows])
            out["churn"] = torch.from_numpy(self.churn[rows])
        return out


def labelled_dataset(
    frame: pd.DataFrame, vocab: SequenceVocab, scaler: FeatureScaler
) -> SequenceDataset:
    return SequenceDataset(
        parse_sequences(frame[SEQUENCE_COLUMN], vocab),
        scaler.transform(frame),
        tier_index(frame["value_tier"]),
        frame["is_churned"].to_numpy(dtype="float32"),
    )


def loader(dataset: SequenceDataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=dataset.batch,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


# ---------------------------------------------------------------------------------------------
# Self-supervised pretraining: CoLES.


def random_slices(
    events: EventArrays, rng: np.random.Generator, min_share: float = 0.4
) -> EventArrays:
    """One random contiguous slice of each sequence (at least ``min_share`` of it, one event),
    re-padded so that the slice's newest event sits at position 0; gaps are recomputed from
    days so the slice's oldest event has none."""
    n = len(events.kinds)
    numbers = np.zeros_like(events.numbers)
    kinds = np.zeros_like(events.kinds)
    categories = np.zeros_like(events.categories)
    texts = np.zeros_like(events.texts)
    lengths = np.zeros_like(events.lengths)
    for row in range(n):
        size = int(events.lengths[row])
        if size == 0:
            continue
        keep = int(rng.integers(max(1, math.ceil(min_share * size)), size + 1))
        start = int(rng.integers(0, size - keep + 1))
        stop = start + keep
        numbers[row, :keep] = events.numbers[row, start:stop]
        numbers[row, keep - 1, 1] = 0.0  # the slice's oldest event has no previous event
        kinds[row, :keep] = events.kinds[row, start:stop]
        categories[row, :keep] = events.categories[row, start:stop]
        texts[row, :keep] = events.texts[row, start:stop]
        lengths[row] = keep
    return EventArrays(numbers, kinds, categories, texts, lengths)


class CoLESModule(pl.LightningModule):
    """Contrastive pretraining of the event encoder on sub-sequences of the same customer."""

    def __init__(self, spec: dict, text_vectors: np.ndarray | None, lr: float, temperature: float):
        super().__init__()
        self.save_hyperparameters(ignore=["text_vectors"])
        self.encoder = EventEncoder(SequenceSpec(**spec), text_vectors)
        hidden = self.encoder.hidden
        self.projection = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 64))

    def contrastive_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        first = F.normalize(self.projection(self.encoder(batch["first"])), dim=-1)
        second = F.normalize(self.projection(self.encoder(batch["second"])), dim=-1)
        logits = first @ second.T / self.hparams.temperature
        target = torch.arange(len(first), device=logits.device)
        forward = F.cross_entropy(logits.float(), target)
        return (forward + F.cross_entropy(logits.T.float(), target)) / 2

    def training_step(self, batch, batch_idx):
        loss = self.contrastive_loss(batch)
        self.log("pretrain_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)


class PairBatches:
    """Collate for pretraining: two independent random slices of each sampled customer."""

    def __init__(self, dataset: SequenceDataset, seed: int) -> None:
        self.dataset, self.rng = dataset, np.random.default_rng(seed)

    def __call__(self, rows: list[int]) -> dict[str, dict[str, torch.Tensor]]:
        part = self.dataset.events.take(np.asarray(rows))
        return {
            "first": SequenceDataset(random_slices(part, self.rng)).batch(np.arange(len(rows))),
            "second": SequenceDataset(random_slices(part, self.rng)).batch(np.arange(len(rows))),
        }


def pretrain(
    events: EventArrays,
    spec: SequenceSpec,
    text_vectors: np.ndarray,
    cfg,
    trainer_kwargs: dict,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """CoLES on every given sequence with at least two events; returns the encoder's weights
    and the loss per epoch."""
    keep = np.flatnonzero(events.lengths >= 2)
    dataset = SequenceDataset(events.take(keep))
    module = CoLESModule(asdict(spec), text_vectors, cfg.pretrain_lr, cfg.pretrain_temperature)
    data = DataLoader(
        dataset,
        batch_size=cfg.pretrain_batch_size,
        shuffle=True,
        drop_last=len(dataset) > cfg.pretrain_batch_size,
        collate_fn=PairBatches(dataset, cfg.seed),
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    losses = EpochLosses()
    trainer = pl.Trainer(
        max_epochs=cfg.pretrain_epochs,
        callbacks=[losses],
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(module, data)
    return {k: v.cpu() for k, v in module.encoder.state_dict().items()}, losses.values


class EpochLosses(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get("pretrain_loss_epoch")
        if value is not None:
            self.values.append(float(value))


# ---------------------------------------------------------------------------------------------
# Fine-tuning.


class SequenceModel(TwoHeadModule):
    """Fine-tunes the sequence net; layer-wise learning rates (lower layers learn slower)."""

    def __init__(
        self,
        spec: dict,
        n_numeric: int,
        fused_dim: int,
        encoder_lr: float,
        head_lr: float,
        layer_lr_decay: float,
        weight_decay: float,
        churn_loss_weight: float,
        tier_weights: list[float],
        text_vectors: np.ndarray | None = None,
    ) -> None:
        super().__init__(tier_weights)
        self.save_hyperparameters(ignore=["text_vectors"])
        self.net = SequenceNet(SequenceSpec(**spec), n_numeric, fused_dim, text_vectors)

    @classmethod
    def from_config(
        cls,
        cfg,
        spec: SequenceSpec,
        n_numeric: int,
        tier_weights: list[float],
        text_vectors: np.ndarray | None,
    ) -> SequenceModel:
        """Build from a TrainConfig and the encoder's architecture."""
        return cls(
            asdict(spec),
            n_numeric,
            cfg.fused_dim,
            cfg.sequence_lr,
            cfg.head_lr,
            cfg.layer_lr_decay,
            cfg.weight_decay,
            cfg.churn_loss_weight,
            tier_weights,
            text_vectors,
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.net(batch)

    def configure_optimizers(self):
        hp = self.hparams
        bert = self.net.encoder.bert
        layers = list(bert.encoder.layer)
        groups = []
        for depth, layer in enumerate(reversed(layers)):
            groups.append(
                {"params": list(layer.parameters()), "lr": hp.encoder_lr * hp.layer_lr_decay**depth}
            )
        bottom = hp.encoder_lr * hp.layer_lr_decay ** len(layers)
        in_layers = {id(p) for layer in layers for p in layer.parameters()}
        encoder_rest = [p for p in self.net.encoder.parameters() if id(p) not in in_layers]
        groups.append({"params": encoder_rest, "lr": bottom})
        encoder_ids = {id(p) for p in self.net.encoder.parameters()}
        heads = [p for p in self.net.parameters() if id(p) not in encoder_ids]
        groups.append({"params": heads, "lr": hp.head_lr})
        return torch.optim.AdamW(groups, weight_decay=hp.weight_decay)


@torch.inference_mode()
def predict_sequence_net(
    net: SequenceNet,
    vocab: SequenceVocab,
    scaler: FeatureScaler,
    frame: pd.DataFrame,
    batch_size: int = 512,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tier probabilities (n, 3), churn probabilities (n,), fused embeddings (n, d)."""
    from contextlib import nullcontext

    net.eval()
    device = next(net.parameters()).device
    events = parse_sequences(frame[SEQUENCE_COLUMN], vocab)
    dataset = SequenceDataset(events, scaler.transform(frame))
    order = np.argsort(dataset.events.lengths, kind="stable")
    n = len(dataset)
    tiers = np.zeros((n, len(TIERS)), dtype="float32")
    churn = np.zeros(n, dtype="float32")
    embeddings = np.zeros((n, net.fusion[0].out_features), dtype="float32")
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    starts = range(0, n, batch_size)
    with autocast:
        for start in tqdm(starts, desc="predict", unit="batch", disable=not progress):
            rows = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in dataset.batch(rows).items()}
            out = net(batch)
            tiers[rows] = torch.softmax(out["tier_logits"].float(), -1).cpu().numpy()
            churn[rows] = torch.sigmoid(out["churn_logit"].float()).cpu().numpy()
            embeddings[rows] = out["embedding"].float().cpu().numpy()
    return tiers, churn, embeddings


def sequence_digest(sequences: pd.Series, extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for raw in sequences:
        digest.update(raw.encode())
    return digest.hexdigest()[:20]


# ---------------------------------------------------------------------------------------------
# Pretrain (or reuse), then fine-tune.


@dataclass
class FittedSequenceModel:
    net: SequenceNet
    vocab: SequenceVocab
    spec: SequenceSpec
    pretrain_losses: list[float]
    pretrain_reused: bool
    pretrain_sequences: int
    epochs_trained: int
    validation_ece: tuple[float, float]  # before and after calibration


def spec_for(cfg, vocab: SequenceVocab, text_dim: int) -> SequenceSpec:
    return SequenceSpec(
        hidden=cfg.seq_hidden,
        layers=cfg.seq_layers,
        heads=cfg.seq_heads,
        max_events=cfg.max_events,
        n_categories=len(vocab.categories),
        n_texts=len(vocab.text_keys),
        text_dim=text_dim,
        dropout=cfg.dropout,
    )


def trainer_kwargs(cfg) -> dict:
    cuda = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    return {
        "accelerator": "gpu" if cuda else "cpu",
        "devices": 1,
        "precision": "bf16-mixed" if cuda else "32-true",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": True,
        "deterministic": "warn" if cuda else True,
    }


def fit_sequence_model(
    cfg,
    frames: dict[str, pd.DataFrame],
    scaler: FeatureScaler,
    pretrain_sequences: pd.Series,
    texts: pd.DataFrame,
    cache_dir: Path,
    make_trainer,
    tier_weights: list[float],
) -> FittedSequenceModel:
    """Embed the texts (cached), pretrain the encoder with CoLES on ``pretrain_sequences``
    (reused from the cache when the same sequences and settings were pretrained before), then
    fine-tune on ``frames['train']`` with early stopping on ``frames['validation']``.
    ``make_trainer(checkpoint_dir)`` builds the fine-tuning Trainer."""
    keys, vectors = embed_texts(texts, cfg.text_encoder, cache_dir)
    vocab = SequenceVocab.fit(frames["train"][SEQUENCE_COLUMN], keys, cfg.max_events)
    spec = spec_for(cfg, vocab, vectors.shape[1] if len(vectors) else 1)
    settings = json.dumps(
        {
            "spec": asdict(spec),
            "vocab": hashlib.sha256(vocab.to_json().encode()).hexdigest(),
            "text_encoder": cfg.text_encoder,
            "version": PRETRAIN_VERSION,
            **{k: getattr(cfg, k) for k in ("pretrain_epochs", "pretrain_lr", "seed")},
            **{k: getattr(cfg, k) for k in ("pretrain_batch_size", "pretrain_temperature")},
        },
        sort_keys=True,
    )
    key = sequence_digest(pretrain_sequences, settings)
    weights_path = cache_dir / f"coles-{key}.pt"
    losses_path = weights_path.with_suffix(".json")
    events = parse_sequences(pretrain_sequences, vocab)
    reused = weights_path.exists() and losses_path.exists()
    if cfg.pretrain_epochs <= 0:
        state, losses = None, []
    elif reused:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        # Today's text vectors, never the cached ones (the cache keys texts, not vectors).
        state["text_vectors"] = torch.as_tensor(text_table(vectors, len(vocab.text_keys)))
        losses = json.loads(losses_path.read_text())
        log.info("reusing the CoLES encoder pretrained on the same sequences (%s)", weights_path)
    else:
        pl.seed_everything(cfg.seed, workers=True)
        state, losses = pretrain(events, spec, vectors, cfg, trainer_kwargs(cfg))
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, weights_path)
        losses_path.write_text(json.dumps(losses))
    pl.seed_everything(cfg.seed, workers=True)
    module = SequenceModel.from_config(cfg, spec, len(scaler.columns), tier_weights, vectors)
    if state is not None:
        module.net.encoder.load_state_dict(state)
    train = labelled_dataset(frames["train"], vocab, scaler)
    validation = labelled_dataset(frames["validation"], vocab, scaler)
    trainer = make_trainer(cache_dir / f"sequence-checkpoints-{os.getpid()}")
    trainer.fit(
        module,
        loader(train, cfg.batch_size, True, cfg.seed),
        loader(validation, cfg.eval_batch_size, False, cfg.seed),
    )
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:
        module = SequenceModel.load_from_checkpoint(best, map_location="cpu")
        Path(best).unlink(missing_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = module.net.to(device).eval()
    ece = calibrate_churn(net, vocab, scaler, frames["validation"])
    log.info("churn calibration on the validation cutoff: ECE %.4f -> %.4f", *ece)
    # Coherent tiers (lapsed is churned: p_lapsed is the calibrated churn probability), with
    # the decision weights fitted on them, as the ensembles and LightGBM publish.
    net.coherent.fill_(1.0)
    tiers, churn, _ = predict_sequence_net(net, vocab, scaler, frames["validation"])
    weights = fit_tier_weights(
        published_tiers(net, tiers, churn), tier_index(frames["validation"]["value_tier"])
    )
    net.tier_decision.copy_(torch.as_tensor(weights, dtype=net.tier_decision.dtype))
    return FittedSequenceModel(
        net,
        vocab,
        spec,
        losses,
        reused,
        int((events.lengths >= 2).sum()),
        trainer.current_epoch,
        ece,
    )


class SequenceClassifier:
    """The sequence transformer behind the classic models' interface (fit on train with
    validation for early stopping, predict to Predictions), for the backtest and the stack."""

    name = "transformer"

    # Rows scored per read of their sequences when the frame comes without them.
    PREDICT_CHUNK_ROWS = 50_000

    def __init__(
        self,
        cfg,
        texts: pd.DataFrame | None,
        cache_dir: Path | None,
        source: Path | None = None,
    ) -> None:
        """``source`` (a warehouse or training snapshot) supplies the event sequences of frames
        that come without them, only for the rows sampled or scored (bounded memory)."""
        self.cfg, self.texts, self.cache_dir, self.source = cfg, texts, cache_dir, source

    @classmethod
    def from_fitted(
        cls, cfg, fitted: FittedSequenceModel, scaler: FeatureScaler
    ) -> SequenceClassifier:
        """A model fitted by :func:`fit_sequence_model` (train), e.g. as a member of the stack."""
        model = cls(cfg, None, None)
        model.fitted, model.scaler = fitted, scaler
        return model

    def __getstate__(self) -> dict:
        # Pickled inside the stack's registered model: the net (on the CPU, so that a scorer
        # without a GPU loads it) and what it reads, not the training inputs.
        import copy

        state = {**self.__dict__, "texts": None, "cache_dir": None, "source": None}
        if "fitted" in state:
            net = copy.deepcopy(state["fitted"].net).cpu()
            state["fitted"] = replace(state["fitted"], net=net)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "fitted" in state and torch.cuda.is_available():
            self.fitted.net.to("cuda")

    def fit(self, train: pd.DataFrame, validation: pd.DataFrame) -> SequenceClassifier:
        from ml.data import numeric_columns
        from ml.train import _class_weights, make_trainer

        cfg = self.cfg
        # Drawn as `valueloop train` draws in DuckDB (ml.data.read_training_data): training
        # and validation rows stratified by value tier, the pretraining customers apart.
        pretraining = md5_sample(validation, cfg.pretrain_max_customers, f"pretrain:{cfg.seed}")
        train = md5_sample(train, cfg.max_train_rows, cfg.seed, "value_tier")
        validation = md5_sample(validation, cfg.max_val_rows, cfg.seed, "value_tier")
        if SEQUENCE_COLUMN not in train.columns:
            train, validation, pretraining = (
                self._with_sequences(f) for f in (train, validation, pretraining)
            )
        self.scaler = FeatureScaler.fit(train, numeric_columns(train))
        self.fitted = fit_sequence_model(
            cfg,
            {"train": train, "validation": validation},
            self.scaler,
            pretraining[SEQUENCE_COLUMN],
            self.texts,
            self.cache_dir,
            lambda folder: make_trainer(cfg, False, folder),
            _class_weights(train),
        )
        return self

    def raw(self, frame: pd.DataFrame):
        """The net's own outputs: its calibrated churn probability and its tier head's
        probabilities (what an ensemble averages; no decision weights)."""
        from ml.predict import as_predictions

        return as_predictions(*self._outputs(frame))

    def predict(self, frame: pd.DataFrame):
        """What the transformer publishes: coherent tiers (a net fitted before coherent tiers, its
        tier head's), chosen with its decision weights."""
        from ml.predict import as_predictions

        tiers, churn = self._outputs(frame)
        net = self.fitted.net
        return as_predictions(
            published_tiers(net, tiers, churn), churn, net.tier_decision.cpu().numpy()
        )

    def _outputs(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        net = self.fitted.net
        chunks = (
            [frame]
            if SEQUENCE_COLUMN in frame.columns
            else (
                self._with_sequences(frame.iloc[start : start + self.PREDICT_CHUNK_ROWS])
                for start in range(0, len(frame), self.PREDICT_CHUNK_ROWS)
            )
        )
        parts = [
            predict_sequence_net(net, self.fitted.vocab, self.scaler, c, self.cfg.eval_batch_size)
            for c in chunks
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _with_sequences(self, frame: pd.DataFrame) -> pd.DataFrame:
        if self.source is None:
            raise ValueError(
                f"the frame has no {SEQUENCE_COLUMN} column and the model no source to read it"
            )
        return frame.assign(
            **{SEQUENCE_COLUMN: read_sequences(self.source, frame["customer_cutoff_id"])}
        )
