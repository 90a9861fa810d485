"""Reason codes: why a customer got their churn risk and their tier, in plain words.

For a champion built on LightGBM (the LightGBM baseline, or the ensemble's LightGBM half) the
drivers are exact TreeSHAP values (Lundberg et al., 2020, "From local explanations to global
understanding with explainable AI for trees": the algorithm the shap library's TreeExplainer
runs), computed by LightGBM itself (``pred_contrib=True``) so scoring needs nothing more:

* ``churn_reasons``: the three features that move the customer's churn log-odds most, each
  with its direction ("raises risk" / "lowers risk");
* ``tier_reasons``: the three features that most support the predicted tier.

Each feature is written as a sentence about the customer ("no order in 120 days, usually buys
every 30"; "spend down 60% over 90 days"), with a plain fallback for features without one.
The same model and customer always give the same reasons. A sequence-transformer champion gets
its reasons from integrated gradients (:func:`explain_sequence`): its drivers are features and
single events. The document transformer gets none (attributions through its text encoder are
not built).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ml.data import TIERS

TOP = 3


def _num(row: dict, name: str) -> float | None:
    """The feature's number, or None when it is missing or not a number (a category)."""
    value = row.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return None
    return None if math.isnan(value) else float(value)


def _recency(row: dict, value: float) -> str:
    usual = _num(row, "ipt_mean_days")
    text = f"no order in {value:.0f} days"
    return text + (f", usually buys every {usual:.0f}" if usual else "")


def _trend(row: dict, value: float) -> str:
    last, prior = _num(row, "spend_last_90d"), _num(row, "spend_prior_90d")
    if last is not None and prior:
        change = (last - prior) / prior
        return f"spend {'down' if change < 0 else 'up'} {abs(change):.0%} over 90 days"
    return "no spend in the 90 days before the last 90" if value > 0 else "no recent spend"


PHRASES = {
    "recency_days": _recency,
    "spend_trend_90d": _trend,
    "ipt_mean_days": lambda r, v: f"buys every {v:.0f} days on average",
    "ipt_max_days": lambda r, v: f"longest gap between orders {v:.0f} days",
    "ipt_std_days": lambda r, v: f"irregular buyer (gaps vary by {v:.0f} days)",
    "frequency": lambda r, v: f"{v:.0f} orders so far",
    "monetary_value": lambda r, v: f"spent {v:,.0f} in total",
    "gross_spend": lambda r, v: f"spent {v:,.0f} before returns",
    "avg_order_value": lambda r, v: f"orders average {v:,.0f}",
    "tenure_days": lambda r, v: f"customer for {v:.0f} days",
    "first_order_days_ago": lambda r, v: f"first order {v:.0f} days ago",
    "orders_last_30d": lambda r, v: f"{v:.0f} orders in the last 30 days",
    "orders_last_90d": lambda r, v: f"{v:.0f} orders in the last 90 days",
    "orders_last_180d": lambda r, v: f"{v:.0f} orders in the last 180 days",
    "spend_last_30d": lambda r, v: f"spent {v:,.0f} in the last 30 days",
    "spend_last_90d": lambda r, v: f"spent {v:,.0f} in the last 90 days",
    "spend_last_180d": lambda r, v: f"spent {v:,.0f} in the last 180 days",
    "spend_prior_90d": lambda r, v: f"spent {v:,.0f} in the 90 days before that",
    "spend_rate_vs_before_180d": lambda r, v: f"spending at {v:.1f}x their earlier rate",
    "return_rate": lambda r, v: f"returns {v:.0%} of spend",
    "cancellation_rate": lambda r, v: f"cancels {v:.0%} of spend",
    "discounted_line_share": lambda r, v: f"buys {v:.0%} of items on promotion",
    "n_distinct_products": lambda r, v: f"bought {v:.0f} different products",
    "n_distinct_categories": lambda r, v: f"buys in {v:.0f} categories",
    "top_category_share": lambda r, v: f"{v:.0%} of spend in one category",
    "n_reviews": lambda r, v: f"{v:.0f} reviews written",
    "avg_rating": lambda r, v: f"rates products {v:.1f}/5 on average",
    "min_rating": lambda r, v: f"lowest rating given {v:.0f}/5",
}


def phrase(feature: str, row: dict) -> str:
    """One feature of one customer, in words."""
    raw = row.get(feature)
    value = _num(row, feature)
    if feature in PHRASES and value is not None:
        return PHRASES[feature](row, value)
    label = feature.replace("_", " ")
    if value is None:
        return f"{label} unknown" if raw is None or raw != raw else f"{label} {raw}"
    return f"{label} {value:.3g}"


def lightgbm_of(model) -> object | None:
    """The LightGBM baseline inside a champion (itself, or the ensemble's half), if any."""
    if hasattr(model, "churn_model") and hasattr(model, "tier_model"):
        return model
    inner = getattr(model, "lightgbm", None)
    return inner if inner is not None and hasattr(inner, "churn_model") else None


def explain(model, frame: pd.DataFrame, published: pd.Series | None = None):
    """``churn_reasons`` and ``tier_reasons`` per row of ``frame`` (same index), or None when
    the model has no LightGBM to explain. ``published``: the tiers the champion published
    (an ensemble's or a stack's may differ from its LightGBM's): the reasons support those."""
    trees = lightgbm_of(model)
    if trees is None:
        return None
    x = trees._matrix(frame)
    names = list(x.columns)
    churn = trees.churn_model.predict(x, pred_contrib=True)[:, : len(names)]
    tier_all = trees.tier_model.predict(x, pred_contrib=True)
    tiers = (
        trees.tier_model.predict_proba(x).argmax(axis=1)
        if published is None
        else published.map({t: i for i, t in enumerate(TIERS)}).to_numpy("int64")
    )
    width = len(names) + 1
    rows = np.arange(len(frame))
    churn_top = np.argsort(-np.abs(churn), axis=1, kind="stable")[:, :TOP]
    tier_contrib = tier_all.reshape(len(frame), len(TIERS), width)[rows, tiers, : len(names)]
    tier_top = np.argsort(-tier_contrib, axis=1, kind="stable")[:, :TOP]
    churn_text, tier_text = [], []
    for i, row in enumerate(frame.to_dict("records")):
        churn_text.append(
            "; ".join(
                f"{phrase(names[j], row)} ({'raises' if churn[i, j] > 0 else 'lowers'} risk)"
                for j in churn_top[i]
                if churn[i, j] != 0
            )
        )
        tier = TIERS[tiers[i]]
        tier_text.append(
            "; ".join(
                f"{phrase(names[j], row)} (supports {tier})"
                for j in tier_top[i]
                if tier_contrib[i, j] > 0
            )
        )
    return pd.DataFrame({"churn_reasons": churn_text, "tier_reasons": tier_text}, index=frame.index)


# ---------------------------------------------------------------------------------------------
# The sequence transformer: integrated gradients (captum) over its two inputs, the customer's
# features and its events.

IG_STEPS = 16


def _event_phrase(events: dict, newest_first_position: int) -> str:
    """One event of the customer's sequence in words ("order of 35.20, 12 days ago")."""
    index = len(events["kind"]) - 1 - newest_first_position
    kind, days = events["kind"][index], events["days_before"][index]
    when = "today" if days == 0 else f"{days} day{'s' if days != 1 else ''} ago"
    if kind == "review":
        return f"{events['rating'][index]}-star review, {when}"
    return f"{kind} of {abs(events['amount'][index]):,.2f}, {when}"


def explain_sequence(net, vocab, scaler, frame: pd.DataFrame, batch_size: int = 256):
    """``churn_reasons`` and ``tier_reasons`` of the sequence transformer: integrated gradients
    (Sundararajan et al., 2017; captum) from a baseline customer (mean features, events that
    carry nothing) to this one, on the churn logit and on the predicted tier's logit. The
    drivers are features, phrased as for the tree models, and single events ("order of 35.20,
    12 days ago"). Deterministic for a fixed model and customer."""
    import json

    import torch
    from captum.attr import IntegratedGradients

    from ml.data import SEQUENCE_COLUMN
    from ml.evaluate import decide_tiers
    from ml.sequence import SequenceDataset, parse_sequences

    net.eval()
    device = next(net.parameters()).device
    names = list(scaler.columns)
    parsed = parse_sequences(frame[SEQUENCE_COLUMN], vocab)
    dataset = SequenceDataset(parsed, scaler.transform(frame))
    weights = net.tier_decision.detach().cpu().numpy()

    def churn(numeric, events, mask):
        return net.heads(net.encoder.encode(events, mask), numeric)["churn_logit"]

    def tier(numeric, events, mask):
        return net.heads(net.encoder.encode(events, mask), numeric)["tier_logits"]

    churn_parts, tier_parts, chosen = [], [], []
    for start in range(0, len(dataset), batch_size):
        rows = np.arange(start, min(start + batch_size, len(dataset)))
        batch = {k: v.to(device) for k, v in dataset.batch(rows).items()}
        with torch.no_grad():
            events = net.encoder.embed(batch)
            out = net(batch)
        probs = torch.softmax(out["tier_logits"].float(), -1).cpu().numpy()
        predicted = decide_tiers(probs, weights)
        inputs = (batch["numeric"], events)
        baselines = (torch.zeros_like(inputs[0]), torch.zeros_like(events))
        extra = (batch["mask"],)
        parts = []
        for fn, target in ((churn, None), (tier, torch.as_tensor(predicted, device=device))):
            numeric_attr, event_attr = IntegratedGradients(fn).attribute(
                inputs, baselines, target=target, additional_forward_args=extra, n_steps=IG_STEPS
            )
            per_event = (event_attr.sum(-1) * batch["mask"]).detach().cpu().numpy()
            width = per_event.shape[1]
            padded = np.zeros((len(rows), vocab.max_events))
            padded[:, :width] = per_event
            parts.append(np.concatenate([numeric_attr.detach().cpu().numpy(), padded], 1))
        churn_parts.append(parts[0])
        tier_parts.append(parts[1])
        chosen.append(predicted)
    churn_attr, tier_attr = np.concatenate(churn_parts), np.concatenate(tier_parts)
    tiers = np.concatenate(chosen)
    churn_top = np.argsort(-np.abs(churn_attr), axis=1, kind="stable")[:, :TOP]
    tier_top = np.argsort(-tier_attr, axis=1, kind="stable")[:, :TOP]
    churn_text, tier_text = [], []
    for i, row in enumerate(frame.to_dict("records")):
        events = json.loads(row[SEQUENCE_COLUMN] or "{}")

        def driver(j: int, events=events, row=row) -> str:
            if j < len(names):
                return phrase(names[j], row)
            return _event_phrase(events, j - len(names))

        churn_text.append(
            "; ".join(
                f"{driver(j)} ({'raises' if churn_attr[i, j] > 0 else 'lowers'} risk)"
                for j in churn_top[i]
                if churn_attr[i, j] != 0
            )
        )
        tier_text.append(
            "; ".join(
                f"{driver(j)} (supports {TIERS[tiers[i]]})"
                for j in tier_top[i]
                if tier_attr[i, j] > 0
            )
        )
    return pd.DataFrame({"churn_reasons": churn_text, "tier_reasons": tier_text}, index=frame.index)
