"""What the NumPy metrics save where they run thousands of times: the tier-weight search and
the gate's paired bootstrap, each run with scikit-learn's metrics and with ``ml.evaluate``'s
on the same synthetic holdout in the same run, and their results compared.

    python benchmarks/metrics_speed.py --rows 3000 --resamples 500
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml import evaluate
from ml.evaluate import Predictions, fit_tier_weights, paired_bootstrap


def _sklearn_macro_f1(labels, predicted, n_classes=3) -> float:
    return float(
        f1_score(labels, predicted, average="macro", labels=list(range(n_classes)), zero_division=0)
    )


def _sklearn_roc_auc(y, p) -> float:
    return float(roc_auc_score(y, p))


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--resamples", type=int, default=500)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = args.rows
    tiers = rng.choice(3, n, p=[0.1, 0.6, 0.3])
    churn = (tiers == 2).astype(int) ^ (rng.random(n) < 0.2)
    logits = np.eye(3)[tiers] * 0.8 + rng.normal(0, 0.6, (n, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    spend = rng.gamma(1.0, 50.0, n)
    challenger = Predictions(np.round(probs[:, 2], 2), probs, spend + rng.normal(0, 5, n))
    incumbent = Predictions(rng.random(n), probs[::-1].copy(), rng.random(n))

    def both(label: str, call) -> None:
        numpy_seconds, numpy_result = _timed(call)
        with (
            mock.patch.object(evaluate, "macro_f1", _sklearn_macro_f1),
            mock.patch.object(evaluate, "roc_auc", _sklearn_roc_auc),
        ):
            sklearn_seconds, sklearn_result = _timed(call)
        same = np.allclose(np.asarray(numpy_result), np.asarray(sklearn_result), atol=1e-12)
        print(
            f"{label:<40} scikit-learn {sklearn_seconds:7.2f} s   NumPy {numpy_seconds:6.2f} s   "
            f"{sklearn_seconds / numpy_seconds:5.1f}x faster   same result: {same}"
        )

    print(f"{n:,} rows, {args.resamples} resamples")
    both("tier-weight search (441 macro-F1)", lambda: fit_tier_weights(probs, tiers))
    both(
        f"paired bootstrap ({args.resamples} resamples)",
        lambda: paired_bootstrap(
            tiers, churn, spend, challenger, incumbent, n_resamples=args.resamples
        ),
    )


if __name__ == "__main__":
    main()
