"""Reason codes: they name the customer's real features, in words, the same every time."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ml import reasons
from ml.baselines import LightGBMBaseline
from ml.data import TIERS

FEATURES = ["recency_days", "frequency", "ipt_mean_days", "avg_rating"]


def _customers(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    recency = rng.integers(1, 400, n).astype(float)
    frequency = rng.integers(1, 30, n).astype(float)
    first = recency + rng.integers(0, 700, n)
    churned = rng.random(n) < 1 / (1 + np.exp(-(recency - 200) / 40))
    return pd.DataFrame(
        {
            "customer_id": [f"c{i}" for i in range(n)],
            "recency_days": recency,
            "frequency": frequency,
            "first_order_days_ago": first,
            "avg_order_value": rng.uniform(10, 200, n),
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


def test_an_ensemble_is_explained_by_all_its_members() -> None:
    """The LightGBM + BG/NBD ensemble's reasons come from both members: here LightGBM reads
    only noise, so what drives the churn risk it publishes is BG/NBD's recency, which the
    LightGBM member alone could never name. In probability units the members' attributions
    add up exactly to the mean churn probability's change from their reference customers."""
    from ml.ensemble import AveragedEnsemble

    train, validation = _customers(3000, 0), _customers(800, 1)
    model = AveragedEnsemble(["avg_rating"], 0, 90).fit(train, validation)
    customers = _customers(300, 2)
    out = model.predict(customers)
    published = pd.Series([TIERS[i] for i in out.predicted_tiers()], index=customers.index)
    found = reasons.ensemble_attributions(model, customers, published)
    trees = model.lightgbm.churn_model.predict(
        model.lightgbm._matrix(customers.head(1)), pred_contrib=True
    )[0, -1]
    btyd_reference = model.bg_nbd.predict(
        customers.head(1).assign(**model.bg_nbd.reference)
    ).churn_prob[0]
    reference = (1 / (1 + np.exp(-trees)) + btyd_reference) / 2
    assert np.allclose(found.mean_churn_attr.sum(1), found.mean_churn - reference, atol=1e-9)
    # ... and, through the calibration, to the published probability's change.
    calibrated_reference = model.calibration.predict_proba(
        np.log(reference / (1 - reference)).reshape(1, 1)
    )[0, 1]
    assert np.allclose(found.churn_attr.sum(1), out.churn_prob - calibrated_reference, atol=1e-9)
    stale = customers["recency_days"].idxmax()
    recency = found.features.index("recency_days")
    assert found.churn_attr[customers.index.get_loc(stale), recency] > 0  # raises the risk
    assert np.allclose(
        found.mean_churn,
        (model.lightgbm.raw(customers).churn_prob + model.bg_nbd.predict(customers).churn_prob) / 2,
    )
    why = reasons.explain(model, customers, published)
    assert why.equals(reasons.explain(model, customers, published))  # stable
    btyd = r"no order in |\d+ orders? so far|first order "  # the three features BG/NBD reads
    top = why["churn_reasons"].str.split("; ").str[0]
    assert top.str.match(btyd).mean() > 0.5, top.value_counts().head()
    # A lapsed customer's tier reasons are the drivers that raise their churn risk.
    lapsed = published.index[published == "lapsed"]
    assert len(lapsed) > 10
    for i in lapsed:
        raising = [p for p in why.at[i, "churn_reasons"].split("; ") if "raises risk" in p]
        supports = why.at[i, "tier_reasons"].split("; ")
        assert [p.rsplit(" (", 1)[0] for p in raising] == [p.rsplit(" (", 1)[0] for p in supports][
            : len(raising)
        ]
    # The LightGBM member alone (an ensemble pickled before coherent tiers) cannot see it.
    del model.coherent
    alone = reasons.explain(model, customers, published)
    assert not alone["churn_reasons"].str.contains(btyd).any()


def test_lightgbm_publishes_coherent_tiers_and_explains_those() -> None:
    """What a LightGBM champion publishes: its churn model's probability, P(lapsed) that same
    probability, the tier chosen with decision weights; its reasons explain those (a lapsed
    tier by what raises the risk, a high one by what makes it high). A LightGBM pickled
    before publishes its tier model's probabilities, as it did."""
    train, validation = _customers(3000, 0), _customers(800, 1)
    model = LightGBMBaseline(FEATURES, 0).fit(train, validation)
    customers = _customers(300, 2)
    out, raw = model.predict(customers), model.raw(customers)
    assert np.allclose(out.churn_prob, raw.churn_prob)  # its churn model's own probability
    assert np.allclose(
        raw.churn_prob, model.churn_model.predict_proba(model._matrix(customers))[:, 1]
    )
    assert np.allclose(out.tier_probs[:, 2], out.churn_prob)
    assert np.allclose(out.tier_probs.sum(1), 1.0)
    assert out.tier_weights is not None
    published = pd.Series([TIERS[i] for i in out.predicted_tiers()], index=customers.index)
    why = reasons.explain(model, customers, published)
    assert (published == "lapsed").sum() > 10
    for i in published.index[published == "lapsed"]:
        raising = [
            p.rsplit(" (", 1)[0]
            for p in why.at[i, "churn_reasons"].split("; ")
            if "raises risk" in p
        ]
        supports = [p.rsplit(" (", 1)[0] for p in why.at[i, "tier_reasons"].split("; ")]
        assert supports[: len(raising)] == raising
    # High is many orders here: a high customer's tier is supported by their orders.
    high = published.index[published == "high"]
    assert len(high) > 10
    said = why.loc[high, "tier_reasons"].str.contains("orders so far \\(supports high\\)")
    assert said.mean() > 0.8, why.loc[high, "tier_reasons"].head()
    # Active is a buyer: a recent order, which lowers the churn risk, supports it.
    recent = published.index[(published == "active") & (customers["recency_days"] < 100)]
    assert len(recent) > 10
    said = why.loc[recent, "tier_reasons"].str.contains("no order in [0-9]+ days[^;]*\\(supports")
    assert said.mean() > 0.8, why.loc[recent, "tier_reasons"].head()
    del model.coherent  # pickled before 2026-11-28
    before = model.predict(customers)
    assert np.allclose(before.churn_prob, raw.churn_prob)
    assert np.allclose(before.tier_probs, raw.tier_probs) and before.tier_weights is None


def test_tier_attributions_are_taken_for_buyers_only_and_change_nothing(monkeypatch) -> None:
    """The tier model's TreeSHAP (most of a LightGBM's reason cost) is computed only for the
    customers published as buyers: a lapsed tier is explained by the churn drivers. The
    attributions are exactly those computed for every customer."""
    train, validation = _customers(3000, 0), _customers(800, 1)
    model = LightGBMBaseline(FEATURES, 0).fit(train, validation)
    customers = _customers(300, 2)
    out = model.predict(customers)
    published = pd.Series([TIERS[i] for i in out.predicted_tiers()], index=customers.index)
    buyer = (published != "lapsed").to_numpy()
    assert 10 < buyer.sum() < len(buyer) - 10
    _, _, everyone = reasons._tree_contributions(model, customers)
    _, _, buyers = reasons._tree_contributions(model, customers, buyer)
    assert np.array_equal(buyers[buyer], everyone[buyer]) and not buyers[~buyer].any()
    found = reasons.ensemble_attributions(model, customers, published)
    full = reasons._tree_contributions
    monkeypatch.setattr(
        reasons, "_tree_contributions", lambda trees, frame, rows=None: full(trees, frame)
    )
    every = reasons.ensemble_attributions(model, customers, published)
    np.testing.assert_allclose(found.churn_attr, every.churn_attr, atol=1e-12)
    np.testing.assert_allclose(found.tier_attr, every.tier_attr, atol=1e-12)


def test_the_last_order_day_is_one_driver_with_the_days_since_it() -> None:
    """The events of the orders on the day ``recency_days`` counts from are folded into it, so
    a customer's reasons never say "no order in 30 days (raises risk)" beside "order of 20.00,
    30 days ago (lowers risk)": other events, other features and every total stay as they are."""
    import json

    from ml.data import SEQUENCE_COLUMN

    names = ["recency_days", "frequency"]
    events = {  # oldest first: an order 90 days ago, a return 40 days ago, two orders 30 days ago
        "kind": ["order", "return", "order", "order"],
        "days_before": [90, 40, 30, 30],
        "amount": [10.0, -5.0, 20.0, 7.5],
    }
    frame = pd.DataFrame(
        {
            "recency_days": [30.0, np.nan, 12.0],
            SEQUENCE_COLUMN: [json.dumps(events), "{}", json.dumps(events)],
        }
    )
    # rows x (recency, frequency, events newest first: order 30, order 30, return 40, order 90)
    churn = np.array(
        [
            [0.30, 0.05, -0.10, -0.15, 0.02, -0.01],
            [0.00, 0.10, 0.00, 0.00, 0.00, 0.00],
            [0.20, 0.05, -0.10, -0.15, 0.02, -0.01],
        ]
    )
    tier = churn * 2
    folded_churn, folded_tier = reasons.fold_last_order(frame, names, churn, tier)
    assert np.allclose(folded_churn[0], [0.05, 0.05, 0.0, 0.0, 0.02, -0.01])
    assert np.allclose(folded_tier[0], 2 * folded_churn[0])
    # No order yet, or no order on the day the days since the last order count from: untouched.
    assert np.array_equal(folded_churn[1:], churn[1:])
    assert np.allclose(folded_churn.sum(1), churn.sum(1))
    assert np.array_equal(churn[0], [0.30, 0.05, -0.10, -0.15, 0.02, -0.01])  # not in place
    # Without events, or without the recency feature, there is nothing to fold.
    assert reasons.fold_last_order(frame, names + ["x"] * 4, churn)[0] is churn
    assert reasons.fold_last_order(frame, ["x", "frequency"], churn)[0] is churn


def test_a_missing_feature_says_what_its_absence_means() -> None:
    row = {"ipt_max_days": np.nan, "avg_rating": None, "recency_days": np.nan, "country": "UK"}
    assert reasons.phrase("ipt_max_days", row) == "no repeat order yet"
    assert reasons.phrase("avg_rating", row) == "no reviews written"
    assert reasons.phrase("recency_days", row) == "recency days unknown"
    assert reasons.phrase("country", row) == "country UK"
