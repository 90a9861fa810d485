"""Reason codes: they name the customer's real features, in words, the same every time."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ml import reasons
from ml.baselines import LightGBMBaseline

FEATURES = ["recency_days", "frequency", "ipt_mean_days", "avg_rating"]


def _customers(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    recency = rng.integers(1, 400, n).astype(float)
    frequency = rng.integers(1, 30, n).astype(float)
    churned = rng.random(n) < 1 / (1 + np.exp(-(recency - 200) / 40))
    return pd.DataFrame(
        {
            "customer_id": [f"c{i}" for i in range(n)],
            "recency_days": recency,
            "frequency": frequency,
            "ipt_mean_days": rng.uniform(10, 60, n),
            "avg_rating": rng.uniform(1, 5, n),  # noise
            "country": "UK",
            "acquisition_channel": "web",
            "top_category": "home",
            "is_churned": churned,
            # The tier follows frequency: many orders, high; churned, lapsed.
            "value_tier": np.where(churned, "lapsed", np.where(frequency > 20, "high", "active")),
        }
    )


def test_reasons_name_the_drivers_in_words_and_are_stable() -> None:
    model = LightGBMBaseline(FEATURES, 0).fit(_customers(3000, 0), _customers(800, 1))
    customers = _customers(200, 2)
    first = reasons.explain(model, customers)
    assert first.equals(reasons.explain(model, customers))  # a fixed model: the same words
    stale = customers["recency_days"].idxmax()
    row = customers.loc[stale]
    top = first.at[stale, "churn_reasons"].split("; ")[0]
    assert top == (
        f"no order in {row.recency_days:.0f} days, usually buys every "
        f"{row.ipt_mean_days:.0f} (raises risk)"
    )
    fresh = customers["recency_days"].idxmin()
    assert first.at[fresh, "churn_reasons"].startswith(
        f"no order in {customers.at[fresh, 'recency_days']:.0f} days"
    )
    assert first.at[fresh, "churn_reasons"].split("; ")[0].endswith("(lowers risk)")
    # Every phrase is one of the model's features, about this very customer.
    for i, row in zip(customers.index, customers.to_dict("records"), strict=True):
        said = {reasons.phrase(f, row) for f in [*FEATURES, "country"]}
        parts = first.at[i, "churn_reasons"].split("; ") + first.at[i, "tier_reasons"].split("; ")
        assert {p.rsplit(" (", 1)[0] for p in parts if p} <= said
    frequent = customers.index[customers["frequency"] > 25]
    high = [i for i in frequent if "(supports high)" in first.at[i, "tier_reasons"]]
    assert all("orders so far (supports high)" in first.at[i, "tier_reasons"] for i in high)


def test_a_model_without_trees_has_no_reasons() -> None:
    assert reasons.explain(object(), _customers(5, 3)) is None
