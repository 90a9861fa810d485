"""Reason codes: why a customer got their churn risk and their tier, in plain words.

For a LightGBM champion the drivers are exact TreeSHAP values (Lundberg et al., 2020, "From
local explanations to global understanding with explainable AI for trees": the algorithm the
shap library's TreeExplainer runs), computed by LightGBM itself (``pred_contrib=True``) so
scoring needs nothing more:

* ``churn_reasons``: the three features that move the customer's churn risk most (its
  log-odds, or the same contributions in probability units: the order is the same), each
  with its direction ("raises risk" / "lowers risk");
* ``tier_reasons``: the three features that most support the published tier (a LightGBM
  publishing coherent tiers: a lapsed tier by what raises the churn risk, as an ensemble's,
  :func:`ensemble_attributions`).

Each feature is written as a sentence about the customer ("no order in 120 days, usually buys
every 30"; "spend down 60% over 90 days"), with a plain fallback for features without one.
The same model and customer always give the same reasons. A sequence-transformer champion gets
its reasons from integrated gradients (:func:`explain_sequence`): its drivers are features and
single events (a net publishing coherent tiers, fitted since backtest method 2026-11-28.3, is
explained as an ensemble of one). An ensemble champion (the stack; LightGBM with BG/NBD) is
explained through all of its members, combined as it combines their outputs
(:func:`explain_ensemble`; until 2026-11-28 by its LightGBM member alone). The document
transformer gets none (attributions through its text encoder are not built).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

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


COUNTED = {"order": "orders", "review": "reviews", "product": "products", "category": "categories"}


def _count(value: float, one: str, many: str | None = None) -> str:
    """A count with its noun ("1 order", "12 orders")."""
    return f"{value:.0f} {one if round(value) == 1 else many or one + 's'}"


def without_figures(reason: str) -> str:
    """A reason with the customer's figures replaced by N and its counts in the plural, so that
    the same driver reads the same whatever its value ("N orders so far")."""
    reason = re.sub(r"-?\d[\d,.]*", "N", reason)
    for one, many in COUNTED.items():
        reason = re.sub(rf"\b(N (?:different )?){one}\b", rf"\g<1>{many}", reason)
    return reason


PHRASES = {
    "recency_days": _recency,
    "spend_trend_90d": _trend,
    "ipt_mean_days": lambda r, v: f"buys every {v:.0f} days on average",
    "ipt_max_days": lambda r, v: f"longest gap between orders {v:.0f} days",
    "ipt_std_days": lambda r, v: f"irregular buyer (gaps vary by {v:.0f} days)",
    "frequency": lambda r, v: f"{_count(v, 'order')} so far",
    "monetary_value": lambda r, v: f"spent {v:,.0f} in total",
    "gross_spend": lambda r, v: f"spent {v:,.0f} before returns",
    "avg_order_value": lambda r, v: f"orders average {v:,.0f}",
    "tenure_days": lambda r, v: f"customer for {v:.0f} days",
    "first_order_days_ago": lambda r, v: f"first order {v:.0f} days ago",
    "orders_last_30d": lambda r, v: f"{_count(v, 'order')} in the last 30 days",
    "orders_last_90d": lambda r, v: f"{_count(v, 'order')} in the last 90 days",
    "orders_last_180d": lambda r, v: f"{_count(v, 'order')} in the last 180 days",
    "spend_last_30d": lambda r, v: f"spent {v:,.0f} in the last 30 days",
    "spend_last_90d": lambda r, v: f"spent {v:,.0f} in the last 90 days",
    "spend_last_180d": lambda r, v: f"spent {v:,.0f} in the last 180 days",
    "spend_prior_90d": lambda r, v: f"spent {v:,.0f} in the 90 days before that",
    "spend_rate_vs_before_180d": lambda r, v: f"spending at {v:.1f}x their earlier rate",
    "return_rate": lambda r, v: f"returns {v:.0%} of spend",
    "cancellation_rate": lambda r, v: f"cancels {v:.0%} of spend",
    "discounted_line_share": lambda r, v: f"buys {v:.0%} of items on promotion",
    "n_distinct_products": lambda r, v: f"bought {_count(v, 'different product')}",
    "n_distinct_categories": lambda r, v: f"buys in {_count(v, 'category', 'categories')}",
    "top_category_share": lambda r, v: f"{v:.0%} of spend in one category",
    "n_reviews": lambda r, v: f"{_count(v, 'review')} written",
    "avg_rating": lambda r, v: f"rates products {v:.1f}/5 on average",
    "min_rating": lambda r, v: f"lowest rating given {v:.0f}/5",
}


# What a feature's missing value means (the marts leave it null there), in words: a driver can be
# the absence itself ("no repeat order yet (supports lapsed)"), which "ipt max days unknown"
# did not say.
MISSING = {
    "ipt_mean_days": "no repeat order yet",
    "ipt_max_days": "no repeat order yet",
    "ipt_std_days": "too few repeat orders to show a rhythm",
    "avg_rating": "no reviews written",
    "min_rating": "no reviews written",
    "spend_rate_vs_before_180d": "no spend before the last 180 days",
}


def phrase(feature: str, row: dict) -> str:
    """One feature of one customer, in words."""
    raw = row.get(feature)
    value = _num(row, feature)
    if feature in PHRASES and value is not None:
        return PHRASES[feature](row, value)
    label = feature.replace("_", " ")
    if value is None:
        missing = raw is None or raw != raw
        if missing and feature in MISSING:
            return MISSING[feature]
        return f"{label} unknown" if missing else f"{label} {raw}"
    return f"{label} {value:.3g}"


def lightgbm_of(model) -> object | None:
    """The LightGBM baseline inside a champion (itself, or the ensemble's half), if any."""
    if hasattr(model, "churn_model") and hasattr(model, "tier_model"):
        return model
    inner = getattr(model, "lightgbm", None)
    return inner if inner is not None and hasattr(inner, "churn_model") else None


def _texts(
    frame: pd.DataFrame,
    churn_attr: np.ndarray,
    tier_attr: np.ndarray,
    tiers: np.ndarray,
    driver,
) -> pd.DataFrame:
    """The two reason columns from attributions (rows x drivers): the three drivers that move
    the churn risk most, with their direction, and the three that most support the tier.
    ``driver(row, j)`` puts driver ``j`` of a customer in words."""
    churn_top = np.argsort(-np.abs(churn_attr), axis=1, kind="stable")[:, :TOP]
    tier_top = np.argsort(-tier_attr, axis=1, kind="stable")[:, :TOP]
    churn_text, tier_text = [], []
    for i, row in enumerate(frame.to_dict("records")):
        churn_text.append(
            "; ".join(
                f"{driver(row, j)} ({'raises' if churn_attr[i, j] > 0 else 'lowers'} risk)"
                for j in churn_top[i]
                if churn_attr[i, j] != 0
            )
        )
        tier_text.append(
            "; ".join(
                f"{driver(row, j)} (supports {TIERS[tiers[i]]})"
                for j in tier_top[i]
                if tier_attr[i, j] > 0
            )
        )
    return pd.DataFrame({"churn_reasons": churn_text, "tier_reasons": tier_text}, index=frame.index)


def _tree_contributions(
    trees, frame: pd.DataFrame, tier_rows: np.ndarray | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """LightGBM's exact TreeSHAP: its feature names, the churn log-odds contributions
    (rows x features + 1, the expected value last) and the tier raw-score contributions
    (rows x tiers x features + 1; only for the ``tier_rows`` mask when given, zero elsewhere:
    the three-class tier model is most of the cost)."""
    x = trees._matrix(frame)
    names = list(x.columns)
    churn = trees.churn_model.predict(x, pred_contrib=True)
    tier = np.zeros((len(frame), len(TIERS), len(names) + 1))
    chosen = np.ones(len(frame), bool) if tier_rows is None else tier_rows
    if chosen.any():
        found = trees.tier_model.predict(x[chosen], pred_contrib=True)
        tier[chosen] = found.reshape(int(chosen.sum()), len(TIERS), len(names) + 1)
    return names, churn, tier


def explain(model, frame: pd.DataFrame, published: pd.Series | None = None):
    """``churn_reasons`` and ``tier_reasons`` per row of ``frame`` (same index), or None when
    the model has no LightGBM to explain. ``published``: the tiers the champion published
    (scoring always gives them; without them a model is explained by its LightGBM, with the
    reasons supporting that LightGBM's own most likely tier).

    A model whose tiers agree with its churn probability (the stack, LightGBM with BG/NBD,
    LightGBM since 2026-11-28) is explained as a whole (:func:`explain_ensemble`; a
    LightGBM as an ensemble of one); one pickled before that, by its LightGBM (an ensemble's
    member), with the reasons supporting the tiers it published."""
    if getattr(model, "coherent", False) and published is not None:
        return explain_ensemble(model, frame, published)
    trees = lightgbm_of(model)
    if trees is None:
        return None
    names, churn, tier_all = _tree_contributions(trees, frame)
    tiers = (
        trees.tier_model.predict_proba(trees._matrix(frame)).argmax(axis=1)
        if published is None
        else _tier_indices(published)
    )
    tier_contrib = tier_all[np.arange(len(frame)), tiers, : len(names)]
    return _texts(
        frame,
        churn[:, : len(names)],
        tier_contrib,
        tiers,
        lambda row, j: phrase(names[j], row),
    )


def _tier_indices(published: pd.Series) -> np.ndarray:
    return published.map({t: i for i, t in enumerate(TIERS)}).to_numpy("int64")


# ---------------------------------------------------------------------------------------------
# The sequence transformer: integrated gradients (captum) over its two inputs, the customer's
# features and its events.

# Interpolation steps: on the stack's Online Retail customers 32 give the same top three churn
# drivers as 64 for 98.5% of them, 16 for 89.5% (BENCHMARKS.md, "Reason codes"; 16 until the
# batching below made 32 cheaper than 16 had been).
IG_STEPS = 32
# Customers per batch of integrated gradients (each runs IG_STEPS interpolations of them at
# once): on 2 CPU cores 64 explained the stack's transformer faster than 16 or 256
# (BENCHMARKS.md, "Reason codes").
IG_BATCH = 64


def _event_phrase(events: dict, newest_first_position: int) -> str:
    """One event of the customer's sequence in words ("order of 35.20, 12 days ago")."""
    index = len(events["kind"]) - 1 - newest_first_position
    kind, days = events["kind"][index], events["days_before"][index]
    when = "today" if days == 0 else f"{days} day{'s' if days != 1 else ''} ago"
    if kind == "review":
        return f"{events['rating'][index]}-star review, {when}"
    return f"{kind} of {abs(events['amount'][index]):,.2f}, {when}"


def _sequence_attributions(
    net, vocab, scaler, frame: pd.DataFrame, pick, batch_size: int, tier_rows=None
):
    """Integrated gradients (Sundararajan et al., 2017; captum) from a baseline customer (mean
    features, events that carry nothing) to each customer, through both inputs of the net:
    of the churn logit, and of a tier logit, or the difference of two, that ``pick(tier
    probabilities, rows)`` chooses per row as (plus, minus or None). Returns, per row, the
    churn and the tier attributions (features, then events newest first), the churn logit,
    the chosen tier logit (or difference), the tier probabilities and ``plus``, all in the
    frame's order. The tier's integrated gradients are taken only for the ``tier_rows`` mask
    when given (zero elsewhere): they are half the cost. Customers go in batches sorted by
    sequence length, so ``rows`` (what ``pick`` gets) are frame positions in that order."""
    import torch
    from captum.attr import IntegratedGradients

    from ml.data import SEQUENCE_COLUMN
    from ml.sequence import SequenceDataset, parse_sequences

    net.eval()
    device = next(net.parameters()).device
    dataset = SequenceDataset(
        parse_sequences(frame[SEQUENCE_COLUMN], vocab), scaler.transform(frame)
    )

    def churn(numeric, events, mask, plus, minus):
        return net.heads(net.encoder.encode(events, mask), numeric)["churn_logit"]

    def tier(numeric, events, mask, plus, minus):
        logits = net.heads(net.encoder.encode(events, mask), numeric)["tier_logits"]
        chosen = logits.gather(1, plus[:, None]).squeeze(1)
        return chosen if minus is None else chosen - logits.gather(1, minus[:, None]).squeeze(1)

    parts: dict[str, list] = {k: [] for k in ("churn", "tier", "churn_out", "tier_out", "probs")}
    parts["plus"] = []
    # Customers of like sequence length batched together, as predict_sequence_net does: a
    # batch is padded to its longest sequence, and integrated gradients run every step on it.
    order = np.argsort(dataset.events.lengths, kind="stable")
    for start in range(0, len(dataset), batch_size):
        rows = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in dataset.batch(rows).items()}
        with torch.no_grad():
            events = net.encoder.embed(batch)
            out = net(batch)
        probs = torch.softmax(out["tier_logits"].float(), -1).cpu().numpy()
        plus, minus = pick(probs, rows)
        indices = (
            torch.as_tensor(plus, device=device),
            None if minus is None else torch.as_tensor(minus, device=device),
        )
        wanted = np.ones(len(rows), bool) if tier_rows is None else np.asarray(tier_rows)[rows]
        for key, fn in (("churn", churn), ("tier", tier)):
            found = np.zeros((len(rows), batch["numeric"].shape[1] + vocab.max_events))
            keep = slice(None) if key == "churn" or wanted.all() else np.flatnonzero(wanted)
            if key == "churn" or wanted.any():
                keep_t = keep if isinstance(keep, slice) else torch.as_tensor(keep, device=device)
                numeric, mask = batch["numeric"][keep_t], batch["mask"][keep_t]
                numeric_attr, event_attr = IntegratedGradients(fn).attribute(
                    (numeric, events[keep_t]),
                    (torch.zeros_like(numeric), torch.zeros_like(events[keep_t])),
                    additional_forward_args=(
                        mask,
                        *(None if i is None else i[keep_t] for i in indices),
                    ),
                    n_steps=IG_STEPS,
                )
                per_event = (event_attr.sum(-1) * mask).detach().cpu().numpy()
                width = numeric_attr.shape[1]
                found[keep, :width] = numeric_attr.detach().cpu().numpy()
                found[keep, width : width + per_event.shape[1]] = per_event
            parts[key].append(found)
        logits = out["tier_logits"].float()
        chosen = logits.gather(1, indices[0][:, None]).squeeze(1)
        if indices[1] is not None:
            chosen = chosen - logits.gather(1, indices[1][:, None]).squeeze(1)
        parts["churn_out"].append(out["churn_logit"].float().cpu().numpy())
        parts["tier_out"].append(chosen.cpu().numpy())
        parts["probs"].append(probs)
        parts["plus"].append(np.asarray(plus))
    back = np.argsort(order, kind="stable")  # into the frame's order
    return {k: np.concatenate(v)[back] for k, v in parts.items()}


def fold_last_order(
    frame: pd.DataFrame, names: list[str], *attributions: np.ndarray
) -> list[np.ndarray]:
    """The attributions (rows x ``names``, then events newest first) with the customer's last
    order day as one driver: the events of the orders placed on the day ``recency_days``
    counts from are added to ``recency_days`` and zeroed. They are one fact, when and what the
    last order was, and apart they read as two, often of opposite sign: the transformer reads
    the order's presence as lowering the risk, the trees the days since it as raising it ("no
    order in 142 days (raises risk); order of 1,109.00, 142 days ago (lowers risk)", for 15% of
    the stack's Online Retail customers). Attributions add up, so the sum is the pair's joint
    attribution and every customer's total is unchanged. Without ``recency_days`` among the
    features, or without events, the attributions come back as they are."""
    import json

    from ml.data import SEQUENCE_COLUMN

    width = len(names)
    n_events = attributions[0].shape[1] - width if attributions else 0
    if "recency_days" not in names or n_events <= 0 or SEQUENCE_COLUMN not in frame:
        return list(attributions)
    column = names.index("recency_days")
    folded = [a.copy() for a in attributions]
    pairs = zip(frame[SEQUENCE_COLUMN], frame["recency_days"], strict=True)
    for i, (text, recency) in enumerate(pairs):
        if recency is None or recency != recency:  # no order yet
            continue
        events = json.loads(text or "{}")
        kinds, days = events.get("kind", []), events.get("days_before", [])
        newest = len(kinds) - 1
        positions = [
            width + newest - k
            for k in range(len(kinds))
            if kinds[k] == "order" and days[k] == round(recency) and newest - k < n_events
        ]
        for a in folded:
            a[i, column] += a[i, positions].sum()
            a[i, positions] = 0.0
    return folded


def _sequence_driver(names: list[str]):
    """Driver ``j`` of a sequence model's attributions in words: a feature, or an event."""
    import json

    from ml.data import SEQUENCE_COLUMN

    def driver(row: dict, j: int) -> str:
        if j < len(names):
            return phrase(names[j], row)
        return _event_phrase(json.loads(row[SEQUENCE_COLUMN] or "{}"), j - len(names))

    return driver


def explain_sequence(
    net, vocab, scaler, frame: pd.DataFrame, batch_size: int = IG_BATCH, published=None
):
    """``churn_reasons`` and ``tier_reasons`` of the sequence transformer: integrated gradients
    from a baseline customer (mean features, events that carry nothing) to this one, on the
    churn logit and on the predicted tier's logit. The drivers are features, phrased as for
    the tree models, and single events ("order of 35.20, 12 days ago"). Deterministic for a
    fixed model and customer.

    A net that publishes coherent tiers (fitted since method 2026-11-28.3) is explained as an
    ensemble of one (:func:`ensemble_attributions`), for the tiers it ``published`` (computed
    here when not given): a lapsed tier by what raises the churn risk, since ``p_lapsed`` is
    its churn probability."""
    from types import SimpleNamespace

    from ml.evaluate import decide_tiers, published_tiers
    from ml.sequence import predict_sequence_net

    weights = net.tier_decision.detach().cpu().numpy()
    coherent = getattr(net, "coherent", None)
    if coherent is not None and float(coherent):
        if published is None:
            tiers, churn, _ = predict_sequence_net(net, vocab, scaler, frame, batch_size)
            chosen = decide_tiers(published_tiers(net, tiers, churn), weights)
            published = pd.Series(np.array(TIERS)[chosen], index=frame.index)
        member = SimpleNamespace(fitted=SimpleNamespace(net=net, vocab=vocab), scaler=scaler)
        return explain_ensemble(SimpleNamespace(members=[member]), frame, published, batch_size)
    found = _sequence_attributions(
        net,
        vocab,
        scaler,
        frame,
        lambda probs, rows: (decide_tiers(probs, weights), None),
        batch_size,
    )
    names = list(scaler.columns)
    churn, tier = fold_last_order(frame, names, found["churn"], found["tier"])
    return _texts(frame, churn, tier, found["plus"], _sequence_driver(names))


# ---------------------------------------------------------------------------------------------
# Ensembles (the stack; LightGBM with BG/NBD): every member explained, the attributions
# combined as the ensemble combines the members.


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def as_probability(logit: np.ndarray, attr: np.ndarray) -> np.ndarray:
    """Attributions of a logit (rows x drivers, summing to the logit's change from its
    reference) in units of its probability: each row scaled by the secant of the sigmoid
    between the reference and the logit, so they sum to the probability's change instead
    (the slope at the logit where the two meet)."""
    delta = attr.sum(1)
    here = _sigmoid(logit)
    moved = np.abs(delta) > 1e-9
    secant = np.where(
        moved,
        (here - _sigmoid(logit - delta)) / np.where(moved, delta, 1.0),
        here * (1.0 - here),
    )
    return attr * secant[:, None]


# BG/NBD reads three features (ml.baselines.BGNBDBaseline.rfm).
BTYD_FEATURES = ("frequency", "recency_days", "first_order_days_ago")


def btyd_shapley(model, frame: pd.DataFrame) -> np.ndarray | None:
    """Exact Shapley values of BG/NBD's churn probability over its three features, from its
    reference customer (the training rows' medians) to each customer: rows x 3, summing to
    the probability's change. None for a model fitted before it kept a reference."""
    from itertools import combinations
    from math import factorial

    reference = getattr(model, "reference", None)
    if reference is None:
        return None
    n, k = len(frame), len(BTYD_FEATURES)
    actual = frame[list(BTYD_FEATURES)].astype("float64").to_numpy()
    base = np.array([reference[f] for f in BTYD_FEATURES], dtype="float64")

    def value(coalition: tuple[int, ...]) -> np.ndarray:
        mixed = np.tile(base, (n, 1))
        mixed[:, list(coalition)] = actual[:, list(coalition)]
        columns = dict(zip(BTYD_FEATURES, mixed.T, strict=True))
        other = frame.drop(columns=list(BTYD_FEATURES)).reset_index(drop=True)
        return model.predict(other.assign(**columns)).churn_prob

    values = {c: value(c) for size in range(k + 1) for c in combinations(range(k), size)}
    shapley = np.zeros((n, k))
    for j in range(k):
        others = [i for i in range(k) if i != j]
        for size in range(k):
            weight = factorial(size) * factorial(k - size - 1) / factorial(k)
            for c in combinations(others, size):
                shapley[:, j] += weight * (values[tuple(sorted((*c, j)))] - values[c])
    return shapley


class _Drivers:
    """The drivers of an ensemble's members by name: each feature once, whichever members
    read it (the transformer's events come after them)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def place(self, names, attr: np.ndarray, events: np.ndarray | None = None):
        """A member's attributions (rows x its features) keyed by the ensemble's columns, with
        its event attributions (rows x events) if it has any."""
        for name in names:
            if name not in self.names:
                self.names.append(name)
        return {self.names.index(name): attr[:, i] for i, name in enumerate(names)}, events


@dataclass
class EnsembleAttributions:
    """An ensemble's attributions per customer (rows x drivers: ``features``, then the
    transformer's events, newest first; ``sequence_features`` names the transformer's own
    features, which its event drivers are phrased with)."""

    features: list[str]
    sequence_features: list[str]
    mean_churn: np.ndarray  # the members' mean churn probability, which the ensemble calibrates
    mean_churn_attr: np.ndarray  # its attributions, in probability units
    slope: np.ndarray  # d calibrated / d mean at the customer
    tier_attr: np.ndarray  # of the published tier's probability (first order)
    tiers: np.ndarray

    @property
    def churn_attr(self) -> np.ndarray:
        """Of the calibrated churn probability (to first order)."""
        return self.mean_churn_attr * self.slope[:, None]


def explain_ensemble(
    model, frame: pd.DataFrame, published: pd.Series, batch_size: int = IG_BATCH
) -> pd.DataFrame:
    """The reason columns of an ensemble (:func:`ensemble_attributions`) in words."""
    found = ensemble_attributions(model, frame, published, batch_size)
    width = len(found.features)
    sequence_driver = _sequence_driver(found.sequence_features)

    def driver(row: dict, j: int) -> str:
        if j < width:
            return phrase(found.features[j], row)
        return sequence_driver(row, len(found.sequence_features) + j - width)

    churn, tier = fold_last_order(frame, found.features, found.churn_attr, found.tier_attr)
    return _texts(frame, churn, tier, found.tiers, driver)


def ensemble_attributions(
    model, frame: pd.DataFrame, published: pd.Series, batch_size: int = IG_BATCH
) -> EnsembleAttributions:
    """The reasons of an ensemble whose tiers agree with its churn probability
    (:class:`ml.ensemble.MeanEnsemble`, :class:`ml.ensemble.AveragedEnsemble`; a
    :class:`ml.baselines.LightGBMBaseline`, which calibrates and makes its tiers coherent the
    same way, is an ensemble of one), from all of its members, combined as it combines them:

    * **Churn.** The ensemble calibrates the members' mean churn probability (Platt, monotone).
      Each member's exact attributions are turned into probability units (LightGBM's TreeSHAP
      log-odds and the transformer's integrated gradients of its logit by
      :func:`as_probability`; BG/NBD's exact Shapley values, :func:`btyd_shapley`, are in them
      already) and averaged as the probabilities are, then carried through the calibration's
      slope at the customer. Each member is explained from its own reference customer.
    * **Tier.** ``p_lapsed`` is the calibrated churn probability, so a lapsed customer's tier
      reasons are the churn drivers that raise it. High and active share the rest,
      ``p_t = (1 - churn) x s_t``, with ``s_t`` the members' high-against-active share; to
      first order a driver moves ``p_t`` by ``(1 - churn) x Δs_t - s_t x Δchurn``, where
      ``Δs_t`` is the tier members' attributions of their own high-against-active odds (the
      difference of the two tiers' logits or raw scores), in share units, weighted by each
      member's buyer mass (its high plus active probability; the change of those masses is
      left out, so this is exact with one tier member).

    The drivers are features, in the same words as for one model, and the transformer's
    single events. A BG/NBD member fitted before it kept a reference customer adds nothing to
    the reasons (its churn probability is still in the mean they explain)."""
    from ml.baselines import BGNBDBaseline, LightGBMBaseline
    from ml.ensemble import EPS, _logit

    if isinstance(model, LightGBMBaseline):  # one model, calibrated and coherent the same way
        members = [model]
    else:
        members = getattr(model, "members", None) or [model.lightgbm, model.bg_nbd]
    n = len(frame)
    tiers = _tier_indices(published)
    buyer = tiers != TIERS.index("lapsed")
    plus = np.where(buyer, tiers, TIERS.index("high"))
    minus = np.where(plus == TIERS.index("high"), TIERS.index("active"), TIERS.index("high"))
    drivers = _Drivers()
    churn_parts: list[tuple[dict, np.ndarray | None]] = []
    share_parts: list[tuple[dict, np.ndarray | None]] = []
    churn_probs, buyer_probs = [], []
    event_names: list[str] | None = None
    for member in members:
        if isinstance(member, LightGBMBaseline):
            names, churn, tier_all = _tree_contributions(member, frame, buyer)
            width = len(names)
            churn_probs.append(_sigmoid(churn.sum(1)))
            churn_parts.append(drivers.place(names, as_probability(churn.sum(1), churn[:, :width])))
            rows = np.arange(n)
            odds = tier_all[rows, plus] - tier_all[rows, minus]
            share_parts.append(drivers.place(names, as_probability(odds.sum(1), odds[:, :width])))
            raw = tier_all.sum(2)  # zero for the lapsed (no tier contributions): unused there
            buyer_probs.append(np.exp(raw - raw.max(1, keepdims=True)))
        elif isinstance(member, BGNBDBaseline):
            churn_probs.append(member.predict(frame).churn_prob)
            shapley = btyd_shapley(member, frame)
            if shapley is not None:
                churn_parts.append(drivers.place(BTYD_FEATURES, shapley))
        elif hasattr(member, "fitted"):  # the sequence transformer (ml.sequence.SequenceClassifier)
            net, vocab, scaler = member.fitted.net, member.fitted.vocab, member.scaler
            names = list(scaler.columns)
            found = _sequence_attributions(
                net,
                vocab,
                scaler,
                frame,
                lambda probs, rows: (plus[rows], minus[rows]),
                batch_size,
                buyer,  # a lapsed tier is explained by the churn drivers alone
            )
            width = len(names)
            churn_attr = as_probability(found["churn_out"], found["churn"])
            share_attr = as_probability(found["tier_out"], found["tier"])
            churn_probs.append(_sigmoid(found["churn_out"]))
            churn_parts.append(drivers.place(names, churn_attr[:, :width], churn_attr[:, width:]))
            share_parts.append(drivers.place(names, share_attr[:, :width], share_attr[:, width:]))
            buyer_probs.append(found["probs"])
            event_names = names
        else:
            raise TypeError(
                f"no reason codes for an ensemble member of type {type(member).__name__}"
            )
    width = len(drivers.names)
    n_events = max((e.shape[1] for _, e in churn_parts + share_parts if e is not None), default=0)

    def placed(part) -> np.ndarray:
        by_column, events = part
        total = np.zeros((n, width + n_events))
        for column, values in by_column.items():
            total[:, column] += values
        if events is not None:
            total[:, width : width + events.shape[1]] += events
        return total

    unclipped = np.mean(churn_probs, axis=0)
    mean_attr = sum(placed(part) for part in churn_parts) / len(members)
    calibration = getattr(model, "calibration", None)  # a LightGBM publishes its own
    if calibration is None:
        calibrated, slope = unclipped, np.ones(n)
    else:
        # Through the (monotone) calibration by its secant from the members' reference mean to
        # this one, as the members' logits were: the attributions then add up to the
        # calibrated probability's change (the slope at the customer where the two meet).
        def calibrate(p: np.ndarray) -> np.ndarray:
            return calibration.predict_proba(_logit(np.clip(p, EPS, 1 - EPS))[:, None])[:, 1]

        calibrated = calibrate(unclipped)
        delta = mean_attr.sum(1)
        moved = np.abs(delta) > 1e-9
        mean = np.clip(unclipped, EPS, 1 - EPS)
        tangent = (
            float(calibration.coef_[0, 0]) * calibrated * (1 - calibrated) / (mean * (1 - mean))
        )
        secant = (calibrated - calibrate(unclipped - delta)) / np.where(moved, delta, 1.0)
        slope = np.where(moved, secant, tangent)
    churn_attr = mean_attr * slope[:, None]
    # The ensemble's high-against-active share is the members' buyer mass in plus over their
    # buyer mass: to first order each member's share moves it in proportion to its buyer mass
    # (the change of the masses themselves is left out; exact with one tier member).
    rows = np.arange(n)
    q = [p / p.sum(1, keepdims=True) for p in buyer_probs]
    mass = [m[rows, plus] + m[rows, minus] for m in q]
    total = np.sum(mass, axis=0)
    safe = np.where(total > 0, total, 1.0)
    share_attr = sum(
        placed(part) * np.where(total > 0, b / safe, 1.0 / len(q))[:, None]
        for part, b in zip(share_parts, mass, strict=True)
    )
    share = np.where(total > 0, np.sum([m[rows, plus] for m in q], axis=0) / safe, 0.5)
    tier_attr = np.where(
        buyer[:, None],
        (1 - calibrated)[:, None] * share_attr - share[:, None] * churn_attr,
        churn_attr,
    )
    return EnsembleAttributions(
        drivers.names, event_names or [], unclipped, mean_attr, slope, tier_attr, tiers
    )
