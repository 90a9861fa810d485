"""Predict: the trained net on a DataFrame of features and documents, fast and bounded.

Documents are sorted by length so each batch pads to similar lengths; inference runs under
``torch.inference_mode`` and bf16 autocast on CUDA. Training's evaluation, the MLflow pyfunc
and batch scoring all use this one function.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ml.data import TEXT_COLUMN, TIERS, FeatureScaler, collate, tokenize
from ml.evaluate import Predictions, decide_tiers
from ml.model import CustomerNet

OUTPUT_COLUMNS = ["p_high", "p_active", "p_lapsed", "churn_probability", "value_tier"]


def device_for(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


def predict_net(
    net: CustomerNet,
    tokenizer,
    scaler: FeatureScaler,
    frame: pd.DataFrame,
    max_length: int,
    batch_size: int = 256,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tier probabilities (n, 3), churn probabilities (n,), fused embeddings (n, d)."""
    net.eval()
    device = device_for(net)
    ids = tokenize(tokenizer, frame[TEXT_COLUMN].fillna("").tolist(), max_length)
    numeric = scaler.transform(frame)
    order = np.argsort([len(x) for x in ids], kind="stable")
    tiers = np.zeros((len(ids), len(TIERS)), dtype="float32")
    churn = np.zeros(len(ids), dtype="float32")
    embeddings: np.ndarray | None = None
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    starts = range(0, len(ids), batch_size)
    with torch.inference_mode(), autocast:
        for start in tqdm(starts, desc="predict", unit="batch", disable=not progress):
            chosen = order[start : start + batch_size]
            batch = collate(
                [{"input_ids": ids[i], "numeric": numeric[i]} for i in chosen],
                tokenizer.pad_token_id,
            )
            out = net(
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                batch["numeric"].to(device),
            )
            tiers[chosen] = torch.softmax(out["tier_logits"].float(), -1).cpu().numpy()
            churn[chosen] = torch.sigmoid(out["churn_logit"].float()).cpu().numpy()
            embedding = out["embedding"].float().cpu().numpy()
            if embeddings is None:
                embeddings = np.zeros((len(ids), embedding.shape[1]), dtype="float32")
            embeddings[chosen] = embedding
    if embeddings is None:
        embeddings = np.zeros((0, 0), dtype="float32")
    return tiers, churn, embeddings


def as_predictions(
    tiers: np.ndarray, churn: np.ndarray, tier_weights: np.ndarray | None = None
) -> Predictions:
    return Predictions(
        churn.astype("float64"),
        tiers.astype("float64"),
        tiers[:, TIERS.index("high")].astype("float64"),
        tier_weights,
    )


def output_frame(
    tiers: np.ndarray,
    churn: np.ndarray,
    embeddings: np.ndarray | None,
    index: pd.Index,
    tier_weights: np.ndarray | None = None,
) -> pd.DataFrame:
    """The pyfunc's documented output: tier probabilities, churn, tier (the argmax of the
    probabilities times the model's tier decision weights, if it has them), embedding."""
    out = pd.DataFrame(
        {
            "p_high": tiers[:, 0].astype("float64"),
            "p_active": tiers[:, 1].astype("float64"),
            "p_lapsed": tiers[:, 2].astype("float64"),
            "churn_probability": churn.astype("float64"),
            "value_tier": np.array(TIERS, dtype=object)[decide_tiers(tiers, tier_weights)],
        },
        index=index,
    )
    if embeddings is not None:
        for i in range(embeddings.shape[1]):
            out[f"embedding_{i}"] = embeddings[:, i].astype("float64")
    return out
