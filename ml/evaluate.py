"""Evaluate: the same metrics and plots for every model, on the same frozen holdout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy.stats import rankdata
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from ml.data import TIERS


@dataclass
class Predictions:
    """What every model produces for the holdout (tier probabilities may be absent)."""

    churn_prob: np.ndarray
    tier_probs: np.ndarray | None
    value_score: np.ndarray  # ranks customers by expected future value (for lift)
    # Decision weights on the tier probabilities (fitted for macro-F1, :func:`fit_tier_weights`);
    # the probabilities stay probabilities, only the chosen tier moves.
    tier_weights: np.ndarray | None = None
    # The tier indices a registered model published (its own decision rule, whatever it is);
    # when set, they are the predicted tiers.
    decided: np.ndarray | None = None

    def predicted_tiers(self, rows: np.ndarray | None = None) -> np.ndarray:
        if self.decided is not None:
            return self.decided if rows is None else self.decided[rows]
        probs = self.tier_probs if rows is None else self.tier_probs[rows]
        return decide_tiers(probs, self.tier_weights)


def coherent_tiers(tier_probs: np.ndarray, churn_prob: np.ndarray) -> np.ndarray:
    """Tier probabilities that agree with the churn probability: lapsed is churned (no
    purchase in the horizon, by the labels' definition), so ``p_lapsed`` is ``churn_prob``,
    and high and active share the rest in the ratio ``tier_probs`` gives them (evenly where
    it gives them nothing)."""
    assert TIERS[-1] == "lapsed", TIERS  # lapsed is the last column, built from churn
    if not (np.isfinite(tier_probs).all() and np.isfinite(churn_prob).all()):
        raise ValueError("tier and churn probabilities must be finite")
    buyers = tier_probs[:, : TIERS.index("lapsed")]
    total = buyers.sum(1, keepdims=True)
    share = np.where(total > 0, buyers / np.where(total > 0, total, 1.0), 1.0 / buyers.shape[1])
    return np.column_stack([share * (1.0 - churn_prob)[:, None], churn_prob])


def published_tiers(net, tier_probs: np.ndarray, churn_prob: np.ndarray) -> np.ndarray:
    """The tier probabilities a transformer's net publishes: coherent with its churn
    probability (:func:`coherent_tiers`) when it was fitted so (its ``coherent`` buffer is 1,
    nets fitted since backtest method 2026-11-28.3), else its tier head's, as a net saved
    before publishes."""
    flag = getattr(net, "coherent", None)
    if flag is None or not float(flag):
        return tier_probs
    return coherent_tiers(tier_probs, churn_prob)


def decide_tiers(tier_probs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The tier index per row: the argmax of the probabilities times the decision weights."""
    return (tier_probs if weights is None else tier_probs * np.asarray(weights)).argmax(1)


# The metrics that bootstraps and the tier-weight search compute thousands of times, in
# NumPy: the same figures as scikit-learn's (tests/test_evaluate.py checks them against it),
# with the few checks that matter here instead of its general validation, which cost more
# than the metric itself on every call.


def _binary(y, p) -> tuple[np.ndarray, np.ndarray]:
    """0/1 labels (bool, int or float) as a mask of positives, and finite scores, both 1-D and
    as long as each other; anything else raises."""
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    if y.ndim != 1 or p.shape != y.shape:
        raise ValueError(f"labels and scores must be 1-D and as long: {y.shape} and {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("the scores contain NaN or infinity")
    positive = y == 1
    if not (positive | (y == 0)).all():
        raise ValueError(f"labels must be 0 or 1, got {np.unique(y)[:5].tolist()}")
    return positive, p


def macro_f1(labels, predicted, n_classes: int = len(TIERS)) -> float:
    """``f1_score(labels, predicted, average="macro", labels=range(n_classes),
    zero_division=0)`` for class indices in ``[0, n_classes)``: a class neither labelled nor
    predicted scores 0."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    if labels.ndim != 1 or predicted.shape != labels.shape:
        raise ValueError(
            f"labels and predictions differ in shape: {labels.shape}, {predicted.shape}"
        )
    for name, values in (("labels", labels), ("predictions", predicted)):
        if len(values) and not (
            np.issubdtype(values.dtype, np.integer)
            and 0 <= values.min() <= values.max() < n_classes
        ):
            raise ValueError(f"{name} must be class indices 0 to {n_classes - 1}")
    counts = np.bincount(
        labels.astype(np.int64) * n_classes + predicted.astype(np.int64),
        minlength=n_classes * n_classes,
    ).reshape(n_classes, n_classes)
    hits = np.diag(counts).astype(float)
    denominator = counts.sum(0) + counts.sum(1)  # 2 hits + false positives + false negatives
    f1 = np.divide(2 * hits, denominator, out=np.zeros(n_classes), where=denominator > 0)
    return float(f1.mean())


def roc_auc(y, p) -> float:
    """``roc_auc_score(y, p)`` for 0/1 labels of both kinds: the Mann-Whitney statistic, ties
    counted half."""
    positive, p = _binary(y, p)
    positives = int(positive.sum())
    negatives = len(positive) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("ROC-AUC needs both classes among the labels")
    ranks = rankdata(p)
    return float(
        (ranks[positive].sum() - positives * (positives + 1) / 2) / (positives * negatives)
    )


def average_precision(y, p) -> float:
    """``average_precision_score(y, p)``: precision at each distinct score, weighted by the
    recall gained there."""
    positive, p = _binary(y, p)
    if not positive.any():
        raise ValueError("average precision needs a positive label")
    order = np.argsort(-p, kind="mergesort")
    positive, p = positive[order], p[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]  # last row of each distinct score
    hits = np.cumsum(positive)[last]
    precision = hits / (last + 1)
    recall = hits / hits[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def brier(y, p) -> float:
    """``brier_score_loss(y, p)`` for 0/1 labels."""
    positive, p = _binary(y, p)
    return float(np.mean((p - positive) ** 2))


def fit_tier_weights(tier_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Weights on the high and lapsed probabilities (active fixed at 1) that maximise macro-F1
    on these rows (the validation cutoff): argmax of calibrated probabilities is the rule for
    accuracy, not for macro-F1 over unbalanced tiers. Grid 0.5 to 2.5; ties go to the weights
    nearest to 1."""
    grid = np.round(np.arange(0.5, 2.51, 0.1), 2)
    best, chosen = -1.0, np.ones(len(TIERS))
    for high in grid:
        for lapsed in grid:
            weights = np.array([high, 1.0, lapsed])
            f1 = macro_f1(labels, decide_tiers(tier_probs, weights))
            distance = abs(np.log(high)) + abs(np.log(lapsed))
            if f1 > best + 1e-12 or (
                abs(f1 - best) <= 1e-12 and distance < np.abs(np.log(chosen)).sum()
            ):
                best, chosen = f1, weights
    return chosen


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            error += chosen.mean() * abs(y[chosen].mean() - p[chosen].mean())
    return float(error)


def top_decile_capture(future_spend: np.ndarray, score: np.ndarray) -> float:
    """Share of all future spend made by the 10% of customers the model ranks highest."""
    total = future_spend.sum()
    if total <= 0:
        return 0.0
    top = np.argsort(-score, kind="stable")[: max(1, len(score) // 10)]
    return float(future_spend[top].sum() / total)


def compute_metrics(
    tiers: np.ndarray, churn: np.ndarray, future_spend: np.ndarray, predictions: Predictions
) -> dict[str, float]:
    p = predictions.churn_prob
    metrics = {
        "churn_roc_auc": float(roc_auc_score(churn, p)),
        "churn_pr_auc": float(average_precision_score(churn, p)),
        "churn_brier": float(brier_score_loss(churn, p)),
        "churn_ece": expected_calibration_error(churn, p),
        "top_decile_revenue_capture": top_decile_capture(future_spend, predictions.value_score),
    }
    if predictions.tier_probs is not None:
        predicted = predictions.predicted_tiers()
        labels = list(range(len(TIERS)))
        metrics["tier_macro_f1"] = float(
            f1_score(tiers, predicted, average="macro", labels=labels, zero_division=0)
        )
        for i, tier in enumerate(TIERS):
            metrics[f"tier_{tier}_precision"] = float(
                precision_score(tiers == i, predicted == i, zero_division=0)
            )
            metrics[f"tier_{tier}_recall"] = float(
                recall_score(tiers == i, predicted == i, zero_division=0)
            )
        metrics["customer_score"] = (metrics["churn_roc_auc"] + metrics["tier_macro_f1"]) / 2
    return metrics


def paired_bootstrap(
    tiers: np.ndarray,
    churn: np.ndarray,
    future_spend: np.ndarray,
    challenger: Predictions,
    incumbent: Predictions,
    metric: str = "customer_score",
    n_resamples: int = 500,
    seed: int = 0,
) -> tuple[float, float, float]:
    """The challenger's lead over the incumbent on ``metric`` and its 95% interval, both
    scored on the same customer resamples of the holdout (the backtest's paired test)."""
    from sklearn.utils import resample

    def score(predictions: Predictions, rows: np.ndarray) -> float:
        if metric in ("customer_score", "churn_roc_auc"):  # the gate's metrics, computed alone
            auc = roc_auc(churn[rows], predictions.churn_prob[rows])
            if metric == "churn_roc_auc":
                return auc
            return (auc + macro_f1(tiers[rows], predictions.predicted_tiers(rows))) / 2
        part = Predictions(
            predictions.churn_prob[rows],
            None if predictions.tier_probs is None else predictions.tier_probs[rows],
            predictions.value_score[rows],
            predictions.tier_weights,
            None if predictions.decided is None else predictions.decided[rows],
        )
        return compute_metrics(tiers[rows], churn[rows], future_spend[rows], part)[metric]

    everyone = np.arange(len(churn))
    point = score(challenger, everyone) - score(incumbent, everyone)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_resamples):
        rows = resample(everyone, random_state=rng.integers(2**31 - 1), stratify=churn)
        diffs.append(score(challenger, rows) - score(incumbent, rows))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(point), float(low), float(high)


def plot_all(
    tiers: np.ndarray,
    churn: np.ndarray,
    future_spend: np.ndarray,
    predictions: Predictions,
    out_dir: Path,
    title: str,
) -> list[Path]:
    """Confusion matrix, ROC and PR curves, calibration, lift and gain, as PNG files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    p = predictions.churn_prob

    def save(fig, name: str) -> None:
        fig.suptitle(f"{title}: {name.replace('_', ' ')}")
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)

    if predictions.tier_probs is not None:
        matrix = confusion_matrix(
            tiers, predictions.predicted_tiers(), labels=list(range(len(TIERS)))
        )
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(TIERS)), TIERS)
        ax.set_yticks(range(len(TIERS)), TIERS)
        ax.set_xlabel("predicted tier")
        ax.set_ylabel("true tier")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                color="white" if value > matrix.max() / 2 else "black",
            )
        save(fig, "confusion_matrix")

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    fpr, tpr, _ = roc_curve(churn, p)
    axes[0].plot(fpr, tpr, label=f"AUC {roc_auc_score(churn, p):.3f}")
    axes[0].plot([0, 1], [0, 1], "--", color="grey")
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (churn)")
    axes[0].legend()
    precision, recall, _ = precision_recall_curve(churn, p)
    axes[1].plot(recall, precision, label=f"AP {average_precision_score(churn, p):.3f}")
    axes[1].axhline(churn.mean(), ls="--", color="grey")
    axes[1].set(xlabel="recall", ylabel="precision", title="precision-recall (churn)")
    axes[1].legend()
    save(fig, "roc_pr")

    fig, ax = plt.subplots(figsize=(4.5, 4))
    observed, predicted = calibration_curve(churn, p, n_bins=10, strategy="quantile")
    ax.plot(predicted, observed, "o-")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set(xlabel="predicted churn probability", ylabel="observed churn rate")
    save(fig, "calibration")

    order = np.argsort(-predictions.value_score, kind="stable")
    share = np.arange(1, len(order) + 1) / len(order)
    total = max(future_spend.sum(), 1e-9)
    gain = np.cumsum(future_spend[order]) / total
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    axes[0].plot(share, gain)
    axes[0].plot([0, 1], [0, 1], "--", color="grey")
    axes[0].set(
        xlabel="share of customers (ranked by model)",
        ylabel="share of future spend",
        title="cumulative gain",
    )
    deciles = np.array_split(future_spend[order], 10)
    lift = [d.mean() / max(future_spend.mean(), 1e-9) for d in deciles]
    axes[1].bar(range(1, 11), lift)
    axes[1].axhline(1, ls="--", color="grey")
    axes[1].set(xlabel="decile (1 = highest predicted value)", ylabel="lift", title="lift")
    save(fig, "lift_gain")
    return paths
