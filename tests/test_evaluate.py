"""The NumPy metrics that bootstraps and the tier-weight search call thousands of times give
scikit-learn's figures, ties, missing classes and resampled rows included."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, f1_score, roc_auc_score

from ml.evaluate import average_precision, brier, macro_f1, roc_auc


def _cases():
    rng = np.random.default_rng(7)
    for n in (2, 5, 40, 3000):
        y = rng.integers(0, 2, n)
        y[0], y[-1] = 0, 1  # both classes
        continuous = rng.random(n)
        coarse = np.round(rng.random(n), 1)  # many ties, as calibrated scores have
        yield y, continuous
        yield y, coarse
        yield y, np.full(n, 0.3)  # every score tied
        yield y, coarse[rng.integers(0, n, n)]  # a bootstrap's repeated rows


@pytest.mark.parametrize(("y", "p"), list(_cases()))
def test_the_binary_metrics_match_scikit_learn(y: np.ndarray, p: np.ndarray) -> None:
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert average_precision(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert brier(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-12)


def test_macro_f1_matches_scikit_learn_with_classes_missing() -> None:
    rng = np.random.default_rng(3)
    for n in (1, 7, 500):
        labels, predicted = rng.integers(0, 3, n), rng.integers(0, 3, n)
        cases = [
            (labels, predicted),
            (np.zeros(n, int), predicted),  # one class labelled
            (labels, np.full(n, 2)),  # one class predicted
            (np.ones(n, int), np.ones(n, int)),  # a class neither labelled nor predicted
        ]
        for truth, guess in cases:
            expected = f1_score(truth, guess, average="macro", labels=[0, 1, 2], zero_division=0)
            assert macro_f1(truth, guess) == pytest.approx(expected, abs=1e-12)


def test_labels_may_be_bool_int_or_float_zeros_and_ones() -> None:
    y, p = np.array([0, 1, 1, 0, 1]), np.array([0.1, 0.8, 0.4, 0.4, 0.9])
    for labels in (y.astype(bool), y.astype(float)):
        assert roc_auc(labels, p) == roc_auc(y, p) == roc_auc_score(y, p)
        assert average_precision(labels, p) == pytest.approx(average_precision_score(y, p))
        assert brier(labels, p) == pytest.approx(brier_score_loss(y, p))


@pytest.mark.parametrize("metric", [roc_auc, average_precision, brier])
def test_what_scikit_learn_would_refuse_is_refused(metric) -> None:
    y, p = np.array([0, 1, 1, 0]), np.array([0.1, 0.8, 0.4, 0.3])
    with pytest.raises(ValueError, match="NaN or infinity"):
        metric(y, np.array([0.1, np.nan, 0.4, 0.3]))
    with pytest.raises(ValueError, match="1-D and as long"):
        metric(y, p[:3])
    with pytest.raises(ValueError, match="1-D and as long"):
        metric(y, p[:, None])  # a column would broadcast against the labels
    with pytest.raises(ValueError, match="0 or 1"):
        metric(np.array([1, 2, 2, 1]), p)


def test_macro_f1_refuses_what_is_not_a_class_index() -> None:
    good = np.array([0, 1, 2, 1])
    for bad in (np.array([0, 1, 3, 1]), np.array([0, -1, 2, 1]), np.array([0.0, 1.9, 2.0, 1.0])):
        with pytest.raises(ValueError, match="class indices 0 to 2"):
            macro_f1(bad, good)
        with pytest.raises(ValueError, match="class indices 0 to 2"):
            macro_f1(good, bad)
    with pytest.raises(ValueError, match="differ in shape"):
        macro_f1(good, good[:3])


def test_metrics_that_need_both_classes_say_so() -> None:
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.ones(4), np.arange(4.0))
    with pytest.raises(ValueError, match="positive label"):
        average_precision(np.zeros(4), np.arange(4.0))
