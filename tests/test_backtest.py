"""The rolling-origin backtest: no cutoff learns from labels it could not have known, and the
command runs through the real marts and a real MLflow store."""

from __future__ import annotations

from dataclasses import replace

import duckdb
import mlflow
import numpy as np
import pandas as pd
import pytest

from ml import backtest
from ml.config import TrainConfig
from ml.data import (
    SEQUENCE_COLUMN,
    TEXT_COLUMN,
    high_value_share,
    horizon_days,
    read_mart,
    read_per_cutoff,
)
from tests.conftest import REPO_ROOT, run_valueloop
from valueloop.config import Settings


def _frame(days: list[str], customers: int = 50) -> pd.DataFrame:
    rows = [
        {"customer_id": f"c{i}", "as_of": pd.Timestamp(day), "is_labelled": True}
        for day in days
        for i in range(customers)
    ]
    return pd.DataFrame(rows)


def _assert_no_leak(origins: list[backtest.Origin], horizon: int) -> None:
    for origin in origins:
        known = pd.concat([origin.train, origin.validation])
        assert (known["as_of"] + pd.Timedelta(days=horizon) <= origin.cutoff).all()
        assert (origin.test["as_of"] == origin.cutoff).all()
        assert len(origin.train) and len(origin.validation) and len(origin.test)


def test_each_cutoff_trains_only_on_labels_known_by_then() -> None:
    days = [str(d.date()) for d in pd.date_range("2025-01-01", periods=9, freq="30D")]
    origins = backtest.origins(_frame(days), n_cutoffs=4, horizon=90)
    assert [str(o.cutoff.date()) for o in origins] == days[-4:]
    _assert_no_leak(origins, 90)
    # The latest cutoff learns from the six before its label window; the newest of them
    # validates.
    latest = origins[-1]
    assert latest.training_cutoffs == days[:6]
    assert set(latest.validation["as_of"]) == {pd.Timestamp(days[5])}


def test_with_one_known_cutoff_a_fifth_of_its_customers_validates() -> None:
    origins = backtest.origins(_frame(["2025-01-01", "2025-04-15"], 200), n_cutoffs=4, horizon=90)
    assert len(origins) == 1
    origin = origins[0]
    _assert_no_leak(origins, 90)
    assert not set(origin.train["customer_id"]) & set(origin.validation["customer_id"])
    assert 0.1 < len(origin.validation) / 200 < 0.3


def _labelled(days: list[str], customers: int = 100) -> pd.DataFrame:
    """Spend grows tenfold from one cutoff to the next; one customer in ten buys nothing;
    customer c1 at every cutoff carries a correction that says high; c2 one that says "did
    not churn", which leaves the buyer's tier to the threshold."""
    frame = _frame(days, customers)
    step = frame["as_of"].rank(method="dense").astype(int)
    number = frame["customer_id"].str[1:].astype(int)
    spend = (number + 1.0) * 10.0**step
    buys = number % 10 != 0
    return frame.assign(
        future_orders=np.where(buys, 1, 0),
        future_spend=np.where(buys, spend, 0.0),
        value_tier=np.where(buys, "active", "lapsed"),  # what a pooled threshold could say
        label_source=np.select(
            [number == 1, number == 2], ["feedback:f1", "feedback:f2"], "derived"
        ),
        tier_corrected=number == 1,
    ).assign(value_tier=lambda f: np.where(number == 1, "high", f["value_tier"]))


def test_each_cutoff_draws_its_tiers_with_the_threshold_its_known_labels_give() -> None:
    """A high-value threshold pooled over cutoffs lets later spend decide earlier tiers; each
    origin sets its own from what it knew, and the later cutoffs' spend moves none of them."""
    days = [str(d.date()) for d in pd.date_range("2025-01-01", periods=6, freq="30D")]
    frame = _labelled(days)
    plan = backtest.origins(frame, n_cutoffs=2, horizon=90, high_share=0.2)
    for origin in plan:
        known = pd.concat([origin.train, origin.validation])
        buyers = known.loc[known["future_spend"] > 0, "future_spend"]
        threshold = buyers.quantile(0.8)
        for rows in (origin.train, origin.validation, origin.test):
            drawn = ~rows["tier_corrected"]
            expected = np.where(
                rows["future_orders"] == 0,
                "lapsed",
                np.where(rows["future_spend"] >= threshold, "high", "active"),
            )
            assert (rows["value_tier"][drawn] == expected[drawn]).all()
            assert (rows.loc[~drawn, "value_tier"] == "high").all()  # the correction stays
            # "Did not churn" on a buyer set no tier: c2's follows the threshold (the marts'
            # says active; at the richer test cutoff it is high).
            c2 = (rows["customer_id"] == "c2").to_numpy()
            assert c2.any() and (rows.loc[c2, "value_tier"] == expected[c2]).all()
        # A fifth of the known buyers is high; the test cutoff, ten times richer, is all high
        # but its lapsed customers.
        assert (known["value_tier"] == "high").sum() == pytest.approx(0.2 * len(buyers), abs=3)
        assert set(origin.test["value_tier"]) == {"high", "lapsed"}
    # Later spend changes nothing an origin knew: the first origin's labels are the same
    # when the last cutoff's spend is a thousand times larger.
    richer = frame.assign(
        future_spend=np.where(
            frame["as_of"] == frame["as_of"].max(),
            frame["future_spend"] * 1000,
            frame["future_spend"],
        )
    )
    first, again = plan[0], backtest.origins(richer, 2, 90, high_share=0.2)[0]
    for a, b in ((first.train, again.train), (first.test, again.test)):
        pd.testing.assert_series_equal(a["value_tier"], b["value_tier"])
    # Churn never depends on the threshold.
    assert all(
        (o.test["value_tier"] == "lapsed").eq(o.test["future_orders"] == 0).all() for o in plan
    )


def test_a_backtest_with_other_classic_seeds_speaks_for_no_training_run() -> None:
    cfg = TrainConfig.load(REPO_ROOT / "ml" / "configs" / "tiny.yaml")
    assert backtest.model_config_tag(cfg, cfg.seed) == cfg.model_fingerprint()
    other = backtest.model_config_tag(cfg, cfg.seed + 1)
    assert other != cfg.model_fingerprint()
    assert other != replace(cfg, seed=cfg.seed + 1).model_fingerprint()


def test_too_little_history_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="n_training_cutoffs"):
        backtest.origins(_frame(["2025-01-01", "2025-02-01"]), n_cutoffs=4, horizon=90)


def test_paired_intervals_separate_a_real_win_from_noise() -> None:
    rng = np.random.default_rng(0)
    n = 2000
    churn = rng.random(n) < 0.4
    test = pd.DataFrame(
        {
            "is_churned": churn,
            "future_spend": np.where(churn, 0, rng.gamma(2, 50, n)),
            "value_tier": np.where(churn, "lapsed", "active"),
        }
    )
    signal = churn + rng.normal(0, 1.0, n)

    def predictions(noise: float, seed: int) -> backtest.Predictions:
        p = 1 / (1 + np.exp(-(signal + np.random.default_rng(seed).normal(0, noise, n))))
        return backtest.Predictions(p, None, -p)

    samples = rng.integers(0, n, size=(200, n))

    def diff(a, b) -> np.ndarray:
        values = [
            backtest.metric_values(test, a, s)["churn_roc_auc"]
            - backtest.metric_values(test, b, s)["churn_roc_auc"]
            for s in samples
        ]
        return np.array(values)

    good, worse, twin = predictions(0.1, 1), predictions(2.0, 2), predictions(0.1, 3)
    low, high = backtest._interval(diff(good, worse))
    assert low > 0  # a clearly better model: the interval excludes zero
    low, high = backtest._interval(diff(good, twin))
    assert low < 0 < high  # the same model with other noise: within the noise


def test_the_bootstrap_draws_each_customer_alike_at_every_cutoff() -> None:
    ids = pd.Index([f"c{i}" for i in range(400)])
    bootstrap = backtest.CustomerBootstrap(ids, 30, seed=1)
    early, late = pd.Series(ids[:300]), pd.Series(ids[100:][::-1])  # 200 shared, other order
    shared = ids[100:300]
    for a, b in zip(bootstrap.rows(early), bootstrap.rows(late), strict=True):
        drawn_early = early.iloc[a].value_counts().reindex(shared, fill_value=0)
        drawn_late = late.iloc[b].value_counts().reindex(shared, fill_value=0)
        assert drawn_early.equals(drawn_late)
        assert drawn_early.sum() > 0 and (drawn_early > 1).any()  # with replacement
    # Reproducible, and another seed draws otherwise.
    again = backtest.CustomerBootstrap(ids, 30, seed=1).rows(early)
    assert all(np.array_equal(x, y) for x, y in zip(again, bootstrap.rows(early), strict=True))
    other = backtest.CustomerBootstrap(ids, 30, seed=2).rows(early)
    assert not all(np.array_equal(x, y) for x, y in zip(other, bootstrap.rows(early), strict=True))


def test_the_same_customers_at_two_cutoffs_do_not_narrow_the_mean_interval() -> None:
    """The backtest's interval of a mean over cutoffs counts a customer tested at several
    cutoffs once: the same customers and predictions at two cutoffs (rows in another order)
    give the mean the interval of one cutoff, where draws of its own at each cutoff would
    narrow it by about 1/sqrt(2) (measured here as well, on the same replicates' shapes)."""
    rng = np.random.default_rng(0)
    n = 1500
    churn = rng.random(n) < 0.4
    test = pd.DataFrame(
        {
            "customer_id": [f"c{i}" for i in range(n)],
            "is_churned": churn,
            "future_spend": np.where(churn, 0, rng.gamma(2, 50, n)),
            "value_tier": np.where(churn, "lapsed", "active"),
        }
    )
    signal = churn + rng.normal(0, 1.0, n)
    probs = {
        name: pd.Series(1 / (1 + np.exp(-(signal + rng.normal(0, noise, n)))), test["customer_id"])
        for name, noise in (("good", 0.3), ("worse", 1.5))
    }
    empty = test.iloc[:0]
    plan = [
        backtest.Origin(pd.Timestamp("2025-01-01"), empty, empty, test),
        backtest.Origin(
            pd.Timestamp("2025-02-01"), empty, empty, test.sample(frac=1, random_state=1)
        ),
    ]

    def predict(origin: backtest.Origin, rows: pd.DataFrame) -> dict:
        out = {}
        for name, p in probs.items():
            aligned = p.loc[rows["customer_id"]].to_numpy()
            out[name] = backtest.Predictions(aligned, None, -aligned)
        return out

    names = ["good", "worse"]
    per_cutoff, replicates = backtest.evaluate_cutoffs(plan, names, predict, 200, seed=3)
    cutoffs = ["2025-01-01", "2025-02-01"]
    paired = backtest._paired(per_cutoff, replicates, names, cutoffs, "worse")
    auc = paired[paired["metric"] == "churn_roc_auc"].set_index("cutoff")
    one = auc.at["2025-01-01", "high"] - auc.at["2025-01-01", "low"]
    mean = auc.at["mean", "high"] - auc.at["mean", "low"]
    assert auc.at["mean", "low"] > 0
    assert mean == pytest.approx(one, rel=1e-9)
    # Independent draws per cutoff (the second cutoff's replicates shifted by one resample)
    # would have made the same mean's interval narrower.
    shifted = {
        k: (v if k[0] == cutoffs[0] else pd.concat([v.iloc[1:], v.iloc[:1]], ignore_index=True))
        for k, v in replicates.items()
    }
    narrow = backtest._paired(per_cutoff, shifted, names, cutoffs, "worse")
    narrow = narrow[narrow["metric"] == "churn_roc_auc"].set_index("cutoff")
    assert narrow.at["mean", "high"] - narrow.at["mean", "low"] < 0.85 * one


def test_the_backtest_command_runs_on_the_real_marts_and_logs_to_mlflow(
    pipeline_run: Settings,
) -> None:
    settings = pipeline_run
    warehouse = settings.warehouse_path
    horizon = horizon_days(warehouse)
    whole = read_mart(warehouse, "training_set")
    plan = backtest.origins(whole, 2, horizon, high_value_share(warehouse))
    _assert_no_leak(plan, horizon)
    # The tiers a cutoff is scored on come from a threshold set by the labels known there,
    # with the marts' share; the marts' own tiers (one threshold on the train split) and
    # churn are otherwise the same labels.
    assert high_value_share(warehouse) == pytest.approx(0.2)
    for origin in plan:
        # The threshold as DuckDB computes it over the labels known at the cutoff.
        known_days = origin.training_cutoffs  # every labelled cutoff known there, as dates
        with duckdb.connect(str(warehouse), read_only=True) as con:
            (threshold,) = con.execute(
                "select quantile_cont(future_spend, 0.8) from marts.training_set"
                " where future_spend > 0 and as_of::varchar in (select unnest($days))",
                {"days": known_days},
            ).fetchone()
        test = origin.test[(origin.test["future_orders"] > 0) & ~origin.test["tier_corrected"]]
        assert len(test) and (test["value_tier"] == "high").sum() > 0
        assert (test["value_tier"] == "high").eq(test["future_spend"] >= threshold).all()
        # Lapsed is churned, as in the marts.
        assert (origin.test["value_tier"] == "lapsed").eq(origin.test["is_churned"]).all()

    result = run_valueloop(
        "evaluate",
        "--backtest",
        "--cutoffs",
        "2",
        "--bootstrap",
        "30",
        "--config",
        str(REPO_ROOT / "ml" / "configs" / "tiny.yaml"),
        home=settings.home,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "rolling-origin backtest over 2 cutoffs" in result.stdout
    assert "paired difference in mean churn ROC-AUC against" in result.stdout
    folder = settings.home / "reports" / "backtest"
    table = pd.read_csv(folder / "backtest_metrics.csv")
    assert set(table["model"]) == {
        "lightgbm",
        "lightgbm_rfm",
        "bg_nbd",
        "rfm_rule",
        "ensemble",
        "transformer",
        "stack",
    }
    assert table["cutoff"].nunique() == 3  # two cutoffs and their mean
    auc = table[(table.metric == "churn_roc_auc") & (table.cutoff == "mean")]
    assert ((auc["low"] <= auc["value"]) & (auc["value"] <= auc["high"])).all()
    assert (folder / "backtest_metrics.png").stat().st_size > 0

    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(backtest.EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("valueloop.kind") == "backtest"]
    children = [r for r in runs if r.data.tags.get("valueloop.kind") == "backtest-cutoff"]
    assert len(parents) == 1 and len(children) == 2
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert "lightgbm_churn_roc_auc" in children[0].data.metrics
    assert "bg_nbd_churn_roc_auc" in parents[0].data.metrics
    artifacts = [a.path for a in client.list_artifacts(parents[0].info.run_id, "plots")]
    assert artifacts == ["plots/backtest_metrics.png"]


def test_the_backtest_reads_at_most_its_cap_per_cutoff_in_the_same_proportions(
    pipeline_run: Settings,
) -> None:
    """Memory bounded by cutoffs x cap: each cutoff an md5 draw, stratified by value tier,
    the same rows every time, without the sequences (read later for the rows drawn)."""
    warehouse, cap = pipeline_run.warehouse_path, 120
    whole = read_mart(warehouse, "training_set")
    capped = read_per_cutoff(warehouse, cap, 42, without=(SEQUENCE_COLUMN, TEXT_COLUMN))
    assert SEQUENCE_COLUMN not in capped.columns and TEXT_COLUMN not in capped.columns
    pd.testing.assert_frame_equal(
        capped, read_per_cutoff(warehouse, cap, 42, without=(SEQUENCE_COLUMN, TEXT_COLUMN))
    )
    assert set(capped["customer_cutoff_id"]) <= set(whole["customer_cutoff_id"])
    sizes, full = capped.groupby("as_of").size(), whole.groupby("as_of").size()
    assert (full > cap).all()  # the cap binds on every cutoff of this shop
    assert ((sizes - cap).abs() <= 2).all()  # each tier's share rounded once
    shares = pd.crosstab(capped["as_of"], capped["value_tier"], normalize="index")
    expected = pd.crosstab(whole["as_of"], whole["value_tier"], normalize="index")
    assert (shares - expected).abs().to_numpy().max() < 0.02

    result = backtest.run(
        warehouse,
        None,
        None,
        n_cutoffs=2,
        n_bootstrap=10,
        models=("rfm_rule", "bg_nbd"),
        max_rows_per_cutoff=cap,
    )
    assert [o["test_rows"] for o in result.origins] == [
        sizes[pd.Timestamp(o["cutoff"])] for o in result.origins
    ]
