"""The loop: campaigns with control groups, feedback as raw data, uplift, monitoring, triggers."""

from __future__ import annotations

import copy
import json
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from ml import uplift
from ml.config import TrainConfig
from ml.data import label_corrections
from tests.conftest import REPO_ROOT, run_valueloop
from valueloop import (
    campaigns,
    jobs,
    market,
    monitoring,
    orchestration,
    pipeline,
    retraining,
    transform,
)
from valueloop.config import Settings, load_settings
from valueloop.ingest import IngestError, ensure_raw_schema
from valueloop.quality.runner import run_checkpoint
from valueloop.simulator import SimulationConfig, generate

TIERS = ("high", "active", "lapsed")
BANDS = ("low", "medium", "high")


def published_scores(settings: Settings, n: int = 3000, seed: int = 0) -> pd.DataFrame:
    """A warehouse with published scores and scoring features, as `valueloop score` leaves it."""
    rng = np.random.default_rng(seed)
    tier = rng.choice(TIERS, n, p=[0.1, 0.4, 0.5])
    scores = pd.DataFrame(
        {
            "customer_id": [f"C{i:05d}" for i in range(n)],
            "as_of": pd.Timestamp("2025-12-30").date(),
            "value_tier": tier,
            "churn_risk_band": rng.choice(BANDS, n),
            "segment_name": rng.choice(["loyal", "at-risk", "new"], n),
            "next_best_action": rng.choice(["nurture_email", "cross_sell", "no_action"], n),
            "p_high": rng.random(n),
            "churn_probability": rng.random(n),
            "model_version": "1",
            "scoring_run_id": "run-1",
        }
    )
    features = pd.DataFrame({"customer_id": scores["customer_id"]})
    for name in campaigns.UPLIFT_FEATURES:
        if name not in scores:
            features[name] = rng.random(n) * 10
    settings.ensure_dirs()
    with duckdb.connect(str(settings.warehouse_path)) as con:
        ensure_raw_schema(con)
        con.execute("create schema if not exists marts")
        con.register("_s", scores)
        con.register("_f", features)
        con.execute("create table marts.customer_scores as select * from _s")
        con.execute("create table marts.scoring_set as select * from _f")
        con.execute(
            "insert into raw.customers (customer_id, signed_up_at, _source_file, _row_number,"
            " _loaded_at, _batch_id) select customer_id, timestamp '2024-01-01', 'f', 1,"
            " now(), 'b' from _s"
        )
    return scores


def assignments(settings: Settings, campaign_id: str | None = None) -> pd.DataFrame:
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        return con.execute(
            "select * from marts.campaign_assignments"
            + (" where campaign_id = ?" if campaign_id else "")
            + " order by customer_key",
            [campaign_id] if campaign_id else [],
        ).df()


def test_customers_without_a_segment_or_tier_get_their_control_group_too() -> None:
    frame = pd.DataFrame(
        {
            "customer_key": [f"k{i}" for i in range(300)],
            "action": "cross_sell",
            "segment_name": [None] * 100 + ["loyal"] * 200,
            "value_tier": ["active"] * 200 + [np.nan] * 100,
        }
    )
    flags = campaigns.control_flags(frame, "cmp-x", 0.1)
    assert [flags[:100].sum(), flags[100:200].sum(), flags[200:].sum()] == [10, 10, 10]


def test_the_campaign_split_is_reproducible_stratified_and_controls_are_never_exported(
    settings: Settings,
) -> None:
    published_scores(settings)
    first = campaigns.plan(settings, "cmp-a")
    rows = assignments(settings, "cmp-a")
    again = campaigns.plan(settings, "cmp-a", replace=True)  # planned afresh: identically
    assert len(rows) == first.treated + first.control == again.treated + again.control
    assert rows.equals(assignments(settings, "cmp-a"))
    share = settings.campaign_control_share
    for _, stratum in rows.groupby(["action", "segment_name", "value_tier"]):
        control = (stratum["group_name"] == "control").sum()
        assert np.floor(len(stratum) * share) <= control <= np.ceil(len(stratum) * share)
    assert abs((rows["group_name"] == "control").mean() - share) < 0.02
    # Never more than the budget; exploration gives some customers a random eligible action.
    assert rows["expected_cost"].sum() <= settings.campaign_budget
    assert set(rows["policy"]) == {"playbook", "explore"}
    assert (rows.loc[rows["group_name"] == "control", "expected_cost"] == 0).all()
    exported = pd.read_csv(first.export_csv)
    assert list(exported.columns) == list(campaigns.EXPORT_COLUMNS)
    treated = set(rows.loc[rows["group_name"] == "treatment", "customer_key"])
    assert set(exported["customer_key"]) == treated
    assert pd.read_parquet(first.export_parquet).shape[0] == len(treated)
    # The key is the dbt macro's pseudonym of the id, never the id itself.
    salt = settings.resolve_pii_salt()
    ids = [f"C{i:05d}" for i in range(3000)]
    assert set(exported["customer_key"]) <= {campaigns.customer_key(salt, c) for c in ids}
    assert not set(exported["customer_key"]) & set(ids)
    # Another campaign id draws another split.
    with duckdb.connect(str(settings.warehouse_path)) as con:
        con.execute("delete from marts.campaign_assignments")
        con.execute("delete from marts.campaigns")
    campaigns.plan(settings, "cmp-b")
    other = assignments(settings, "cmp-b")
    common = rows.merge(other, on="customer_key")
    assert (common["group_name_x"] != common["group_name_y"]).any()


def test_a_planned_campaign_is_kept_as_exported_unless_planned_afresh(settings: Settings) -> None:
    published_scores(settings)
    first = campaigns.plan(settings, "cmp-a")
    exported, before = first.export_csv.read_bytes(), assignments(settings, "cmp-a")
    # The same data scored again with another policy (a new champion, say): the campaign may
    # already have gone out, so planning it again returns it as it was exported.
    with duckdb.connect(str(settings.warehouse_path)) as con:
        con.execute("update marts.customer_scores set next_best_action = 'nurture_email'")
    kept = campaigns.plan(settings, "cmp-a")
    assert kept == replace(first, kept=True)
    assert "kept as it was planned" in kept.summary()
    assert assignments(settings, "cmp-a").equals(before)
    assert first.export_csv.read_bytes() == exported
    # Planned afresh on purpose, before any outcome came back: the new scores decide.
    fresh = campaigns.plan(settings, "cmp-a", replace=True)
    assert not fresh.kept
    rows = assignments(settings, "cmp-a")
    assert set(rows.loc[rows["policy"] == "playbook", "action"]) == {"nurture_email"}
    assert first.export_csv.read_bytes() != exported


def test_a_plan_that_fails_to_store_leaves_no_campaign_file(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The activation tool must never read a campaign the warehouse does not hold.
    published_scores(settings)

    def fails(*args, **kwargs) -> None:
        raise duckdb.IOException("disk full")

    monkeypatch.setattr(campaigns, "_store", fails)
    with pytest.raises(duckdb.IOException, match="disk full"):
        campaigns.plan(settings, "cmp-f")
    assert list(settings.campaigns_dir.iterdir()) == []
    monkeypatch.undo()
    plan = campaigns.plan(settings, "cmp-f")
    assert sorted(p.name for p in settings.campaigns_dir.iterdir()) == [
        "cmp-f.csv",
        "cmp-f.parquet",
    ]
    assert pd.read_csv(plan.export_csv).shape[0] == plan.treated
    # A process that died between the commit and moving the files in: planning the campaign
    # again finds it stored and writes its files again, as they were.
    exported = plan.export_csv.read_bytes()
    plan.export_csv.unlink()
    plan.export_parquet.unlink()
    kept = campaigns.plan(settings, "cmp-f")
    assert kept.kept and plan.export_csv.read_bytes() == exported
    pd.testing.assert_frame_equal(
        pd.read_parquet(plan.export_parquet),
        pd.read_csv(plan.export_csv, parse_dates=["assigned_at"]),
        check_dtype=False,
    )


def test_a_tight_budget_keeps_the_exploration_share_for_the_explored(tmp_path: Path) -> None:
    settings = load_settings(env={"VALUELOOP_CAMPAIGN_BUDGET": "150"}, home=tmp_path / "h")
    published_scores(settings)
    # The uplift policy has an expected profit for every customer's action: before, those
    # rows all came ahead of the explored ones, and a tight budget left no exploration.
    with duckdb.connect(str(settings.warehouse_path)) as con:
        con.execute(
            "create or replace table marts.customer_scores as select *,"
            " 'uplift-v1' as action_policy, hash(customer_id) % 500 / 100.0"
            " as expected_incremental_profit from marts.customer_scores"
        )
    campaigns.plan(settings, "cmp-a")
    rows = assignments(settings, "cmp-a")
    actions = campaigns.load_actions(settings)
    cost = rows["action"].map(lambda a: actions[a].cost)
    share = settings.campaign_exploration_share
    explored = cost[rows["policy"] == "explore"].sum()
    assert cost.sum() <= 150 + 1e-9
    most = max(a.cost for a in actions.values())
    # (The policy's prefix may leave a little of its part unspent, which exploration takes.)
    assert 150 * share - most <= explored <= 150 * share + most
    # The rest went to the policy's customers, best expected profit first.
    uplift_rows = rows[rows["policy"] == "uplift-v1"]
    assert len(uplift_rows) and uplift_rows["expected_incremental_profit"].min() >= 1.0


def test_a_campaign_with_every_customer_left_out_is_empty(settings: Settings) -> None:
    scores = published_scores(settings, n=40).assign(
        policy="playbook", expected_incremental_profit=np.nan
    )
    scores["customer_key"] = [f"k{i}" for i in range(len(scores))]
    chosen = campaigns._choose(
        scores, campaigns.load_actions(settings), "cmp-z", settings, set(scores["customer_key"])
    )
    assert chosen.empty


def test_customers_in_an_open_campaign_or_unsubscribed_are_left_out(settings: Settings) -> None:
    published_scores(settings)
    first = campaigns.plan(settings, "cmp-a")
    second = campaigns.plan(settings, "cmp-b")  # same day: every cmp-a customer is still open
    keys_a = set(assignments(settings, "cmp-a")["customer_key"])
    keys_b = set(assignments(settings, "cmp-b")["customer_key"])
    assert keys_a and keys_b and not keys_a & keys_b
    assert second.excluded_open == first.treated + first.control


def outcome_rows(settings: Settings) -> tuple[pd.DataFrame, list[tuple[dict, str | None]]]:
    rows = assignments(settings, "cmp-a")
    treated = rows[rows["group_name"] == "treatment"]["customer_key"].tolist()
    control = rows[rows["group_name"] == "control"]["customer_key"].iloc[0]
    at = "2025-12-31 10:00:00"
    good = dict(campaign_id="cmp-a", customer_key=treated[0], event="delivered", occurred_at=at)
    cases = [
        (good, None),
        ({**good, "event": "converted", "revenue": "42.50"}, None),
        ({**good, "customer_key": treated[1], "event": "opened"}, None),
        ({**good, "campaign_id": "cmp-nope"}, "campaign_id: no campaign cmp-nope"),
        ({**good, "customer_key": "nobody"}, "customer_key: nobody is not a customer of"),
        ({**good, "customer_key": control}, "is in the control group of cmp-a"),
        ({**good, "occurred_at": "2025-12-01 10:00:00"}, "occurred_at: 2025-12-01 10:00:00 is"),
        (good, "event: duplicate delivered"),
        ({**good, "event": "opened", "revenue": "5"}, "revenue: 5.0000 on a opened event"),
        ({**good, "event": "converted", "customer_key": treated[2]}, "revenue: a converted"),
        # Its corrected resend loads: a quarantined row is no original to be a duplicate of.
        ({**good, "event": "converted", "customer_key": treated[2], "revenue": "12"}, None),
        ({**good, "event": "converted", "customer_key": treated[3], "revenue": "0"}, "revenue: a"),
        ({**good, "event": "bought"}, "event: bought is not one of"),
        ({**good, "event": "converted", "revenue": "-3"}, "revenue: -3 outside the plausible"),
        ({**good, "occurred_at": "yesterday"}, "occurred_at: cannot parse yesterday"),
    ]
    return pd.DataFrame([c for c, _ in cases]), cases


def test_bad_feedback_is_quarantined_with_its_reason_and_every_row_is_accounted_for(
    tmp_path: Path,
) -> None:
    # One of the 15 outcome rows is implausible on purpose; the batch should still pass GX.
    settings = load_settings(env={"VALUELOOP_IMPLAUSIBLE_SHARE_MAX": "0.1"}, home=tmp_path / "h")
    published_scores(settings)
    campaigns.plan(settings, "cmp-a")
    frame, cases = outcome_rows(settings)
    outcomes = settings.feedback_dir / "campaign_outcomes" / "cmp-a.csv"
    outcomes.parent.mkdir(parents=True)
    frame.to_csv(outcomes, index=False)
    labels = settings.feedback_dir / "label_feedback" / "corrections.csv"
    labels.parent.mkdir(parents=True)
    label_cases = [
        ("f1", "C00001", "is_churned", "false", "2025-01-01", "", None),
        ("f2", "C00002", "value_tier", "high", "2025-01-01", "2025-06-30", None),
        ("f3", "X9", "value_tier", "high", "2025-01-01", "", "customer_id: no customer X9"),
        ("f4", "C00003", "mood", "happy", "2025-01-01", "", "label: mood is not one of"),
        ("f5", "C00003", "value_tier", "vip", "2025-01-01", "", "corrected_value: vip is not"),
        ("f6", "C00003", "is_churned", "true", "2025-06-01", "2025-01-01", "valid_to: 2025-01-01"),
        ("f1", "C00004", "is_churned", "true", "2025-01-01", "", "feedback_id: f1 was already"),
        ("f7", "X8", "is_churned", "false", "2025-01-01", "", "customer_id: no customer X8"),
        ("f7", "C00005", "is_churned", "false", "2025-01-01", "", None),  # the resend loads
    ]
    pd.DataFrame(
        [
            dict(
                feedback_id=f,
                customer_id=c,
                label=lab,
                corrected_value=v,
                valid_from=a,
                valid_to=b,
                reason="moved to the B2B account",
                source="account team",
                submitted_at="2026-01-05 09:00:00",
            )
            for f, c, lab, v, a, b, _ in label_cases
        ]
    ).to_csv(labels, index=False)

    report = jobs.ingest_path(settings, settings.feedback_dir, "feedback")
    for result in report.results:
        assert result.rows_read == result.rows_accepted + result.rows_quarantined
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        quarantined = dict(
            con.execute(
                "select entity || ':' || _row_number, reason from raw.quarantine"
            ).fetchall()
        )
        accepted = con.execute("select count(*) from raw.campaign_outcomes").fetchone()[0]
    for row, (_, reason) in enumerate(cases, start=1):
        if reason is None:
            assert f"campaign_outcomes:{row}" not in quarantined, row
        else:
            assert reason in quarantined[f"campaign_outcomes:{row}"], (row, quarantined)
    assert accepted == sum(reason is None for _, reason in cases)
    for row, case in enumerate(label_cases, start=1):
        key = f"label_feedback:{row}"
        if case[-1] is None:
            assert key not in quarantined, key
        else:
            assert case[-1] in quarantined[key], (key, quarantined.get(key))
    # Once outcomes came back, the campaign is not planned again.
    with pytest.raises(campaigns.CampaignSent, match="cmp-a already went out"):
        campaigns.plan(settings, "cmp-a")
    # Loading the same files again adds nothing.
    again = jobs.ingest_path(settings, settings.feedback_dir, "feedback")
    assert all(r.skipped for r in again.results)
    # What the feedback DAG lands is the feedback files alone: a note left beside them is
    # named in the log and left where it is (before, it was read as a CSV and stopped it).
    (outcomes.parent / "README.md").write_text("exported by the e-mail tool every night\n")
    landed = pipeline.land_feedback(settings)
    assert sorted(Path(item["path"]).name for item in landed) == ["cmp-a.csv", "corrections.csv"]
    totals = pipeline.ingest_landed(settings, landed)
    assert totals["read"] == 0 and totals["skipped"] == totals["files"] == 2
    # An unreadable file (no event column) holds back none landed after it: the feedback DAG
    # loads the others and names it (its last task then fails the run).
    frame.drop(columns=["event"]).to_csv(outcomes.parent / "a-broken.csv", index=False)
    more = labels.with_name("more.csv")
    pd.read_csv(labels).iloc[[0]].assign(feedback_id="f8").to_csv(more, index=False)
    landed = pipeline.land_feedback(settings)
    with pytest.raises(IngestError, match=r"a-broken\.csv"):
        pipeline.ingest_landed(settings, landed)
    (outcomes.parent / "b-truncated.parquet").write_bytes(b"PAR1 half a file")
    landed = pipeline.land_feedback(settings)
    totals = pipeline.ingest_landed(settings, landed, keep_going=True)
    broken, truncated = totals["rejected"]
    assert "a-broken.csv" in broken and "event" in broken
    assert "b-truncated.parquet" in truncated
    assert totals["accepted"] == 1  # more.csv
    # Great Expectations checks the feedback batches like any other.
    result = run_checkpoint(settings, "raw", "feedback-test")
    names = {r.check.name for r in result.results}
    assert {"campaign_outcomes.row_count", "campaign_outcomes.revenue_without_conversion"} <= names
    assert "label_feedback.row_count" in names


def _outcomes(
    feature: str, values: np.ndarray, arms: np.ndarray, orders: np.ndarray, revenue: np.ndarray
) -> pd.DataFrame:
    """Randomised campaign outcomes as the uplift model reads them: one feature varies, the
    others are 0; controls are held out of the offer."""
    n = len(values)
    frame = pd.DataFrame({f: 0.0 for f in uplift.FEATURES}, index=range(n))
    frame[feature] = values
    return frame.assign(
        customer_key=[f"k{i}" for i in range(n)],
        campaign_id="c",
        action=np.where(arms == "control", "offer", arms),
        group_name=np.where(arms == "control", "control", "treatment"),
        orders=orders,
        revenue=revenue,
    )


def test_the_uplift_learner_finds_a_planted_effect_and_the_qini_sees_it() -> None:
    rng = np.random.default_rng(0)
    n = 6000
    x = rng.normal(size=n)
    arms = rng.choice(["control", "offer", "email"], n, p=[0.3, 0.35, 0.35])
    base = np.exp(-0.5 + 0.3 * x)
    # The offer brings an extra order only where x > 0; the email does nothing.
    rate = base + np.where((arms == "offer") & (x > 0), 0.8, 0.0)
    orders = rng.poisson(rate)
    value = 20 + 5 * rng.random(n)
    frame = _outcomes("recency_days", x, arms, orders, orders * value)
    model = uplift.OrdersLearner(0, {"offer": 0.0}).fit(frame)
    effects = model.effects(frame)
    assert effects.loc[x > 0.5, "offer"].mean() > 10
    assert abs(effects.loc[x < -0.5, "offer"].mean()) < 3
    assert abs(effects["email"].mean()) < 3
    actions, profit = uplift.choose(effects, {"offer": 2.0, "email": 1.0}, 0.35)
    assert (actions[x > 0.5] == "offer").mean() > 0.9
    assert (actions[x < -0.5] == "no_action").mean() > 0.8
    assert (profit >= 0).all()
    treated = arms == "offer"
    chosen = arms != "email"
    y, t = frame["revenue"].to_numpy()[chosen], treated[chosen]
    right = uplift.qini_coefficient(y, t, x[chosen])
    wrong = uplift.qini_coefficient(y, t, -x[chosen])
    assert right > 0 > wrong


def _planted(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Randomised outcomes where the offer brings 0.8 extra orders only to customers with
    churn risk above 0.5, and the email does nothing."""
    rng = np.random.default_rng(seed)
    risk = rng.random(n)
    arms = rng.choice(["control", "offer", "email"], n, p=[0.3, 0.35, 0.35])
    orders = rng.poisson(
        np.exp(-0.5 + 0.3 * risk) + np.where((arms == "offer") & (risk > 0.5), 0.8, 0)
    )
    return _outcomes("churn_probability", risk, arms, orders, orders * 20.0), risk


def test_the_cell_learner_measures_an_effect_per_cell_and_the_policy_respects_its_error() -> None:
    frame, risk = _planted(8000, 3)
    model = uplift.CellLearner(0, {"offer": 0.0, "email": 0.0}).fit(frame)
    effects, errors = model.effects(frame), model.std_errors(frame)
    # 0.8 orders x 20 where the offer works, nothing elsewhere, each within a few errors.
    works, idle = risk > 0.6, risk < 0.4
    assert abs(effects.loc[works, "offer"].mean() - 16) < 4 * errors.loc[works, "offer"].mean()
    assert abs(effects.loc[idle, "offer"].mean()) < 4 * errors.loc[idle, "offer"].mean()
    assert (errors > 0).all().all()
    costs = {"offer": 2.0, "email": 0.1}
    playbook = np.full(len(frame), "email", object)
    actions, _ = uplift.choose(effects, costs, 0.35, None, playbook, errors, 1.64)
    assert (actions[works] == "offer").mean() > 0.95  # a clear gain beats the playbook
    # The email's estimate is noise around zero: where the offer does nothing, the policy does
    # not trade the playbook's email for no action or the offer on noise alone.
    assert (actions[idle] != "offer").all()
    # With a tenth of the evidence, the errors are wider and the playbook is kept more often.
    small, _ = _planted(800, 4)
    weak = uplift.CellLearner(0, {"offer": 0.0, "email": 0.0}).fit(small)
    kept = uplift.choose(
        weak.effects(small),
        costs,
        0.35,
        None,
        np.full(len(small), "email", object),
        weak.std_errors(small),
        1.64,
    )[0]
    assert (kept == "email").mean() > (actions == "email").mean()
    # Part of each error is the cell's controls, the same for both actions: never more than
    # the whole error, and nothing where an action falls back to its effect over all cells.
    shared = model.shared_std_errors(frame)
    assert ((shared > 0) & (shared < errors)).all().all()
    weak.cell_effects["offer"] = weak.cell_effects["offer"].iloc[:0]
    assert (weak.shared_std_errors(small)["offer"] == 0).all()


def _target(population: pd.DataFrame) -> uplift.PolicyTarget:
    """The customers a campaign would act on: the playbook sends everyone the email."""
    return uplift.PolicyTarget(
        frame=population[list(uplift.FEATURES)],
        playbook=np.full(len(population), "email", object),
        eligible=[["offer", "email"]] * len(population),
        costs={"offer": 2.0, "email": 0.1},
        bounded=frozenset({"email"}),
        margin=0.35,
        confidence_z=1.64,
        unsubscribe_cost=0.0,
    )


def test_a_discount_is_charged_whole_in_the_expected_profit() -> None:
    """The offer takes 20% off every order of the window: beyond margin x the revenue it moves,
    it gives away (1 - margin) x 20% of the list value of the orders placed with it, the ones
    placed anyway included. So where it brings no order it loses the discount on the orders
    the customer places anyway, and its profit error per extra order is (margin - d) of the
    list value, not margin x (1 - d)."""
    frame, risk = _planted(8000, 3)
    offered = (frame["action"] == "offer") & (frame["group_name"] == "treatment")
    frame = frame.assign(revenue=np.where(offered, 0.8, 1.0) * frame["revenue"])
    model = uplift.CellLearner(0, {"offer": 0.2, "email": 0.0}).fit(frame)
    costs, margin = {"offer": 2.0, "email": 0.1}, 0.35
    effects = model.effects(frame)
    with_offer = model.base_revenue(frame) + effects["offer"].to_numpy()
    given = uplift.discount_costs(model, frame, margin)
    assert np.allclose(given["offer"], (1 - margin) * 0.2 / 0.8 * with_offer)
    assert (given["email"] == 0).all()
    profit = uplift.expected_profits(model, frame, costs, margin, 0.0)
    assert np.allclose(profit["offer"], margin * effects["offer"] - given["offer"] - 2.0)
    # Where the offer brings nothing, it loses 20% of what the customer buys anyway.
    idle = risk < 0.4
    base = model.base_revenue(frame)[idle]
    assert profit.loc[idle, "offer"].mean() == pytest.approx(-0.2 * base.mean() - 2.0, rel=0.25)
    assert uplift.profit_error_scale(model, margin) == {
        "email": pytest.approx(margin),
        "offer": pytest.approx(0.15 / 0.8),
    }
    # Past the margin an extra order loses money: the scale turns negative.
    deep = uplift.CellLearner(0, {"offer": 0.5, "email": 0.0})
    deep.models = dict.fromkeys(["control", "offer", "email"])  # its actions, nothing else
    assert uplift.profit_error_scale(deep, margin)["offer"] == pytest.approx(-0.15 / 0.5)
    # A model without discounts prices as before.
    plain = uplift.CellLearner(0, {"offer": 0.0, "email": 0.0}).fit(frame)
    assert uplift.discount_costs(plain, frame, margin) is None


def test_the_uplift_gate_weighs_the_policy_on_held_out_outcomes() -> None:
    # The gate's paired test: what the challenger's policy would earn over the incumbent's on
    # the customers a campaign would act on, measured on held-out randomised outcomes alone.
    frame, _ = _planted(8000, 3)
    held, _ = _planted(3000, 6)
    target = _target(_planted(2000, 9)[0])
    discounts = {"offer": 0.0, "email": 0.0}
    real = uplift.CellLearner(0, discounts).fit(frame)
    # A model of the real effect sends the offer where it works (0.8 orders x 20 x 0.35 = 5.6
    # for a cost of 2, against the email's 0.1): a gain of about 1.8 a customer over the
    # playbook, as half the customers have a churn risk above 0.5.
    lead, low, high, switched = uplift.policy_lead(real, None, held, target, 200, 0)
    assert 1.0 < low < lead < high < 2.6, (lead, low, high)
    once = high - low
    assert switched > 900  # the offer to about 1,000; the rest, the email dropped in noisy cells
    # A model fitted where the offer worked for the other half: its policy sends the offer
    # where it does nothing, a loss beyond the noise on the same held-out outcomes.
    wrong_frame = frame.assign(churn_probability=1 - frame["churn_probability"])
    wrong = uplift.CellLearner(0, discounts).fit(wrong_frame)
    lead, low, high, _ = uplift.policy_lead(wrong, None, held, target, 200, 0)
    assert low < lead < high < 0, (lead, low, high)
    # ... and against the real model as champion, a larger loss, weighed on a campaign the
    # champion did not learn from: its actions were picked on the noise of its own outcomes,
    # which would flatter it, so those never weigh it.
    assert real.campaigns == {"c"}
    later = held.assign(campaign_id="c-next")
    against = uplift.policy_lead(wrong, real, later, target, 0, 0)
    assert against[0] < lead
    mixed = uplift.policy_lead(wrong, real, pd.concat([held, later]), target, 0, 0)
    assert (mixed[0], mixed[3]) == (against[0], against[3])
    seen = uplift.policy_lead(wrong, real, held, target, 20, 0)
    assert np.isnan(seen[:3]).all() and seen[3] == against[3] > 0
    promote, why = uplift.gate_decision(seen, (real, "3"), "guardrail", len(target.frame))
    assert not promote
    assert "no held-out outcome of a campaign champion v3 did not learn from has a" in why
    why = uplift.gate_decision(against, (real, "3"), "guardrail", len(target.frame))[1]
    assert "on held-out randomised outcomes of campaigns champion v3 did not learn from" in why
    # A champion registered before models recorded their campaigns is weighed on every
    # held-out outcome, as it used to be, and the gate does not claim otherwise.
    legacy = copy.copy(real)
    del legacy.campaigns
    old = uplift.policy_lead(wrong, legacy, held, target, 0, 0)
    assert np.isfinite(old[0]) and old[3] == against[3]
    why = uplift.gate_decision(old, (legacy, "3"), "guardrail", len(target.frame))[1]
    assert "over champion v3 on held-out randomised outcomes (" in why
    # A model against itself changes nothing.
    assert uplift.policy_lead(real, real, held, target, 50, 0) == (0.0, 0.0, 0.0, 0)
    # Without resamples, the point estimate alone.
    point = uplift.policy_lead(real, None, held, target, 0, 0)
    assert point[0] > 0 and np.isnan(point[1]) and np.isnan(point[2])
    # A resample draws customers with all their rows: the same customers' outcomes twice (two
    # campaigns) are no more evidence, and the interval is as wide as once (a resample of rows
    # would narrow it by about 1/sqrt(2)).
    twice = pd.concat([held, held.assign(campaign_id="c2")], ignore_index=True)
    _, low, high, _ = uplift.policy_lead(real, None, twice, target, 200, 0)
    assert (high - low) == pytest.approx(once, rel=0.2)
    # Held-out outcomes without a control measure nothing.
    treated_only = held[held["group_name"] != "control"]
    lead, low, high, switched = uplift.policy_lead(real, None, treated_only, target, 20, 0)
    assert np.isnan([lead, low, high]).all() and switched > 900


def test_the_loop_benchmark_bounds_what_the_cells_could_earn_on_their_own_noise() -> None:
    from benchmarks import loop_policy

    population, risk = _planted(2000, 9)
    target = _target(population)
    # The truth of _planted: the offer earns 0.35 x 0.8 orders x 20 - 2 = 3.6 where churn
    # risk is above 0.5 and loses its cost elsewhere; the email earns nothing for its 0.1.
    profit = pd.DataFrame({"offer": np.where(risk > 0.5, 3.6, -2.0), "email": -0.1})
    some = np.where(risk > 0.5, "offer", np.where(risk < 0.2, "email", "no_action"))
    expected = 3.6 * (risk > 0.5).sum() - 0.1 * (risk < 0.2).sum()
    assert loop_policy.policy_value(profit, some) == pytest.approx(expected)
    best = 3.6 * (risk > 0.5).sum()
    discounts = {"offer": 0.0, "email": 0.0}
    strong = uplift.CellLearner(0, discounts).fit(_planted(8000, 3)[0])
    weak = uplift.CellLearner(0, discounts).fit(_planted(600, 4)[0])
    bounds = {}
    for name, model in (("strong", strong), ("weak", weak)):
        bound = loop_policy.noise_bound(model, target, profit, 0, scales=(1, 10_000), draws=8)
        bounds[name] = bound
        # The cells are churn-risk quartiles, one edge near 0.5: each cell's true mean
        # profit tells most of the offer's customers from the rest.
        assert 0.9 * best < bound["cells_exact"] <= best
        for rule in ("rule", "bayes", "bayes_rule"):
            # With all but no noise, every rule acts on the truth of the cells ...
            assert bound[f"{rule}_x10000"] == pytest.approx(bound["cells_exact"], rel=0.01)
            # ... and on the learner's own noise, none does better than that.
            assert bound[f"{rule}_x1"] <= bound["cells_exact"] + 1e-9
    # 600 outcomes leave the errors wide: the platform's rule keeps the playbook's email
    # where 8,000 outcomes show the offer's gain clearly.
    assert bounds["weak"]["rule_x1"] < 0.9 * best < 0.95 * best < bounds["strong"]["rule_x1"]


@pytest.mark.parametrize(
    ("lead", "champion", "gate", "promote", "why"),
    [
        ((0.05, -0.2, 0.3, 900), None, "guardrail", True, "no loss beyond the noise"),
        (
            (0.05, -0.2, 0.3, 900),
            None,
            "superiority",
            False,
            "no gain beyond the noise, the playbook stays",
        ),
        ((0.4, 0.1, 0.7, 900), "3", "superiority", True, "over champion v3 on held-out"),
        (
            (-0.4, -0.7, -0.1, 900),
            "3",
            "guardrail",
            False,
            "a loss beyond the noise, champion v3 stays",
        ),
        (
            (0.0, 0.0, 0.0, 0),
            None,
            "guardrail",
            True,
            "the same action as the playbook for all 1,000",
        ),
        ((0.0, 0.0, 0.0, 0), None, "superiority", False, "the playbook stays"),
        ((-0.1, float("nan"), float("nan"), 9), None, "guardrail", False, "no interval"),
        ((0.1, float("nan"), float("nan"), 9), None, "superiority", True, "a gain beyond"),
        (None, "3", "guardrail", False, "no published scores"),
        ((float("nan"),) * 3 + (9,), None, "guardrail", False, "no control to measure"),
    ],
)
def test_the_uplift_gate_rules(lead, champion, gate, promote, why) -> None:
    incumbent = (None, champion) if champion else None
    decided, reason = uplift.gate_decision(lead, incumbent, gate, 1000)
    assert decided == promote and why in reason, reason
    with pytest.raises(ValueError, match="unknown uplift gate 'lenient'"):
        uplift.gate_decision(lead, incumbent, "lenient", 1000)


def test_the_cell_learner_weights_quiet_customers_up_and_stays_unbiased() -> None:
    # Half the customers order 4 times a window, half 0.1 times; the offer brings 0.3 extra
    # orders to everyone. The frequent buyers' Poisson noise swamps 0.3; the quiet ones show
    # it clearly, and weighting by 1 / expected orders lets them speak.
    rng = np.random.default_rng(5)
    n = 6000
    frequent = rng.random(n) < 0.5
    arms = rng.choice(["control", "offer"], n, p=[0.3, 0.7])
    orders = rng.poisson(np.where(frequent, 4.0, 0.1) + np.where(arms == "offer", 0.3, 0.0))
    frame = _outcomes("frequency", np.where(frequent, 40.0, 1.0), arms, orders, orders * 10.0)
    weighted = uplift.CellLearner(0, {"offer": 0.0}).fit(frame)
    unweighted = uplift.CellLearner(0, {"offer": 0.0})
    unweighted.VARIANCE_FLOOR = 1e9  # every customer weighs the same
    unweighted.fit(frame)
    error = weighted.std_errors(frame)["offer"].mean()
    assert error < 0.6 * unweighted.std_errors(frame)["offer"].mean()
    # 0.3 orders x the value per order (10), within a few of its own errors.
    assert abs(weighted.effects(frame)["offer"].mean() - 3.0) < 3 * error


def test_from_no_action_a_contact_that_can_only_lose_its_cost_needs_no_clear_gain() -> None:
    # The dbt model scored_customers makes the same choice (its unit test, customer g).
    effects = pd.DataFrame({"email": [0.5, 0.5], "offer": [0.8, 0.8]})
    errors = pd.DataFrame({"email": [1.0, 1.0], "offer": [1.0, 1.0]})
    costs = {"email": 0.0, "offer": 0.0}
    playbook = np.array(["no_action", "offer"], object)
    cautious, _ = uplift.choose(effects, costs, 1.0, None, playbook, errors, 1.64)
    assert list(cautious) == ["no_action", "offer"]
    # The email has no discount: from no action it can lose at most its contact cost, so it
    # is taken on its expected profit; the offer (a discount) still needs a clear gain, and
    # so does a switch away from an action.
    bold, profit = uplift.choose(effects, costs, 1.0, None, playbook, errors, 1.64, None, {"email"})
    assert list(bold) == ["email", "offer"]
    assert list(profit) == [0.5, 0.8]
    # A contact expected to lose is not taken.
    losing, _ = uplift.choose(-effects, costs, 1.0, None, playbook, errors, 1.64, None, {"email"})
    assert losing[0] == "no_action"


def test_unsubscribes_are_counted_per_cell_and_charged_to_the_action_that_causes_them() -> None:
    # The e-mail makes one in ten high-risk customers unsubscribe and no low-risk one; controls
    # are sent nothing. The model must find the rate among the treated, per cell.
    rng = np.random.default_rng(7)
    n = 8000
    risky = rng.random(n) < 0.5
    arms = rng.choice(["control", "offer", "email"], n, p=[0.2, 0.4, 0.4])
    orders = rng.poisson(0.5, n)
    frame = _outcomes("churn_probability", np.where(risky, 0.9, 0.1), arms, orders, orders * 10.0)
    frame["unsubscribed"] = (arms == "email") & risky & (rng.random(n) < 0.1)
    model = uplift.CellLearner(0, {"offer": 0.0, "email": 0.0}).fit(frame)
    rates = model.unsubscribe_rates(frame)
    assert abs(rates["email"][risky].mean() - 0.1) < 0.025  # not 0.1 x 0.4 / 0.6 with controls
    assert rates["email"][~risky].mean() < 0.03
    assert rates["offer"].max() == 0.0
    assert uplift.unsubscribe_costs(model, frame, 0.0) is None
    charged = uplift.unsubscribe_costs(model, frame, 10.0)
    pd.testing.assert_frame_equal(charged, 10.0 * rates)
    # What the registered model returns carries the rates.
    assert "email_unsubscribe_rate" in uplift.predict_frame(model, frame.head(5))
    # A model fitted on outcomes without the column charges nothing.
    assert (
        model.__class__(0, {})
        .fit(frame.drop(columns="unsubscribed"))
        .unsubscribe_rates(frame)
        .to_numpy()
        .max()
        == 0.0
    )

    # The policy charges them: an e-mail worth 0.5 that loses one customer in ten at 10 each
    # is a loss, even from no action, where an action without a discount needs no clear gain.
    effects = pd.DataFrame({"email": [0.5, 0.5]})
    errors = pd.DataFrame({"email": [0.1, 0.1]})
    playbook = np.array(["no_action", "no_action"], object)
    unsubscribes = pd.DataFrame({"email": [0.0, 0.1 * 10.0]})
    actions, profit = uplift.choose(
        effects, {"email": 0.0}, 1.0, None, playbook, errors, 1.64, None, {"email"}, unsubscribes
    )
    assert list(actions) == ["email", "no_action"]
    assert profit[0] == 0.5


def test_a_switch_between_two_actions_does_not_pay_for_their_shared_controls_twice() -> None:
    # The dbt model scored_customers makes the same choice (its unit test, customer f).
    effects = pd.DataFrame({"vip_perk": [2.0, 2.0], "cross_sell": [4.0, 4.0]})
    errors = pd.DataFrame({"vip_perk": [1.0, 1.0], "cross_sell": [1.0, 1.0]})
    shared = pd.DataFrame({"vip_perk": [0.9, 0.9], "cross_sell": [0.9, 0.9]})
    costs = {"vip_perk": 0.0, "cross_sell": 0.0}
    playbook = np.array(["vip_perk", "no_action"], object)
    independent, _ = uplift.choose(effects, costs, 1.0, None, playbook, errors, 1.64)
    # A gain of 2 against 1.64 x sqrt(1 + 1) = 2.32: the perk stays; against no action, 4 is
    # a clear gain either way.
    assert list(independent) == ["vip_perk", "cross_sell"]
    contrast, profit = uplift.choose(effects, costs, 1.0, None, playbook, errors, 1.64, shared)
    # 1.64 x sqrt(1 + 1 - 2 x 0.81) = 1.01 < 2: the controls' noise cancels in the gain.
    assert list(contrast) == ["cross_sell", "cross_sell"]
    assert list(profit) == [4.0, 4.0]
    # No action has no estimate and so no shared part: a gain over it pays the whole error.
    weak = pd.DataFrame({"vip_perk": [1.5, 1.5], "cross_sell": [1.5, 1.5]})
    kept, _ = uplift.choose(weak, costs, 1.0, None, playbook[::-1], errors, 1.64, shared)
    assert list(kept) == ["no_action", "vip_perk"]


def test_psi_is_zero_for_the_same_population_and_large_for_a_shifted_one() -> None:
    rng = np.random.default_rng(1)
    reference = rng.normal(size=5000)
    assert monitoring.psi(reference, rng.normal(size=5000)) < 0.02
    assert monitoring.psi(reference, rng.normal(1.0, 1.0, 5000)) > monitoring.DRIFTED


def test_psi_sees_a_move_off_a_pile_up_and_a_feature_that_stops_arriving() -> None:
    """Quantile edges repeat where a feature piles up (most customers return nothing): the
    pile is a bin of its own, so a move off it is drift, at the bottom and at the top. Missing
    values are a bin too: a feed that stops filling a feature is drift, and the same share
    missing is not."""
    rng = np.random.default_rng(2)

    def mixed(share_zero: float, n: int = 5000) -> np.ndarray:
        return np.where(rng.random(n) < share_zero, 0.0, rng.uniform(0.001, 0.03, n))

    reference = mixed(0.92)
    assert monitoring.profile(reference)["points"] == [True]  # the pile at zero, apart
    assert monitoring.psi(reference, mixed(0.92)) < monitoring.STABLE
    # A decile that lands on a data point of a continuous feature is no pile: a bin of its own
    # would hold 1/n of the reference and nothing of a new sample (small shops' false drift).
    continuous = rng.lognormal(size=201)
    assert not any(monitoring.profile(continuous)["points"])
    same = [monitoring.psi(rng.lognormal(size=201), rng.lognormal(size=201)) for _ in range(20)]
    assert np.mean(same) < monitoring.STABLE
    assert monitoring.psi(reference, mixed(0.50)) > monitoring.DRIFTED
    assert monitoring.psi(np.zeros(5000), mixed(0.6)) > monitoring.DRIFTED  # no discounts before
    top = np.where(rng.random(5000) < 0.95, 1.0, rng.uniform(0, 1, 5000))  # piled at the top
    assert monitoring.psi(top, np.where(rng.random(5000) < 0.5, 1.0, rng.uniform(0, 1, 5000))) > (
        monitoring.DRIFTED
    )
    ratings = np.where(rng.random(5000) < 0.57, np.nan, rng.uniform(1, 5, 5000))
    same = np.where(rng.random(5000) < 0.57, np.nan, rng.uniform(1, 5, 5000))
    assert monitoring.psi(ratings, same) < monitoring.STABLE
    assert monitoring.psi(ratings, np.where(rng.random(5000) < 0.99, np.nan, 3.0)) > (
        monitoring.DRIFTED
    )
    assert monitoring.psi(ratings, np.full(5000, np.nan)) > monitoring.DRIFTED
    nothing = np.full(5000, np.nan)  # no reviews at all when the champion trained
    assert monitoring.psi(nothing, np.full(5000, np.nan)) == 0.0
    assert monitoring.psi(nothing, ratings) > monitoring.DRIFTED
    assert np.isnan(monitoring.psi(ratings, np.array([])))
    # A reference logged before (right-open bins over the values present) reads as it did.
    old = {"edges": [0.0], "shares": [0.0, 1.0], "mean": 0.001}
    assert monitoring.psi_against(old, mixed(0.5)) == 0.0
    assert np.isnan(monitoring.psi_against(old, np.full(10, np.nan)))


def test_tier_migration_counts_the_customers_gone_as_well_as_the_new(settings: Settings) -> None:
    """Between two scoring runs a customer can appear (`new`) or drop out (`gone`); both are
    in the migration table and in the previous run's score distribution."""
    runs = {
        "run-1": {"a": "high", "b": "active", "c": "lapsed"},
        "run-2": {"b": "high", "d": "active"},
    }
    history = pd.DataFrame(
        [
            {
                "scoring_run_id": run,
                "scored_at": pd.Timestamp("2025-01-01") + pd.Timedelta(days=k),
                "as_of": pd.Timestamp("2025-01-01").date(),
                "customer_id": customer,
                "model_version": "1",
                "value_tier": tier,
                "churn_probability": 0.1 + 0.2 * k + 0.1 * j,
                "p_high": 0.5,
            }
            for k, (run, tiers) in enumerate(runs.items())
            for j, (customer, tier) in enumerate(tiers.items())
        ]
    )
    features = pd.DataFrame({f: [1.0, 2.0] for f in monitoring.DRIFT_FEATURES}).assign(
        customer_id=["b", "d"]
    )
    settings.ensure_dirs()
    with duckdb.connect(str(settings.warehouse_path)) as con:
        con.execute("create schema marts")
        con.execute("create schema intermediate")
        con.register("_h", history)
        con.register("_f", features)
        con.execute("create table marts.customer_scores_history as select * from _h")
        con.execute("create table marts.scoring_set as select * from _f")
        con.execute(
            "create table intermediate.int_order_lines_enriched (customer_id varchar,"
            " ordered_on date, is_purchase boolean, is_merchandise boolean)"
        )
        tables = monitoring.record(con, "run-2", 90, reference={}, reference_name="none")
        # Rerunning the same scoring run measures no new data: it keeps when it was measured.
        again = monitoring.record(con, "run-2", 90, reference={}, reference_name="none")
    for name in ("feature_drift", "score_drift"):
        assert again[name]["computed_at"].equals(tables[name]["computed_at"])
    migration = {
        (r.from_tier, r.to_tier): r.customers for r in tables["tier_migration"].itertuples()
    }
    assert migration == {
        ("high", "gone"): 1,
        ("active", "high"): 1,
        ("lapsed", "gone"): 1,
        ("new", "active"): 1,
    }
    score = tables["score_drift"].set_index("score")
    assert score.at["churn_probability", "previous_mean"] == pytest.approx((0.1 + 0.2 + 0.3) / 3)


def test_champion_performance_counts_corrections_and_campaigns_and_each_day_once(
    settings: Settings,
) -> None:
    """How an earlier run's scores did, once its horizon has passed: against the labels as
    corrected by people (a "did not churn" counts), with the customers a campaign treated in the
    horizon told apart, one row per day and model version (the day's last run), and the table
    measured afresh by each scoring run, never piled up."""
    day = pd.Timestamp("2025-01-01")
    scores = {"a": ("active", 0.2), "b": ("lapsed", 0.9), "c": ("high", 0.5), "d": ("lapsed", 0.1)}
    history = pd.DataFrame(
        [
            {
                "scoring_run_id": run,
                "scored_at": at,
                "as_of": as_of,
                "customer_id": customer,
                "model_version": "1",
                "value_tier": tier,
                "churn_probability": probability,
                "p_high": 0.3,
            }
            for run, at, as_of in (
                ("run-a", day + pd.Timedelta(hours=1), day),
                ("run-a-again", day + pd.Timedelta(hours=5), day),  # the same day, later
                ("run-b", day + pd.Timedelta(days=60), day + pd.Timedelta(days=60)),  # not matured
            )
            for customer, (tier, probability) in scores.items()
        ]
    )
    lines = pd.DataFrame(
        {
            "customer_id": ["a", "c", "b", "a"],
            "ordered_on": pd.to_datetime(["2025-02-01", "2025-03-01", "2024-12-01", "2025-04-15"]),
            "is_purchase": True,
            "is_merchandise": True,
        }
    )
    settings.ensure_dirs()
    with duckdb.connect(str(settings.warehouse_path)) as con:
        for schema in ("marts", "intermediate", "staging"):
            con.execute(f"create schema {schema}")
        con.register("_h", history)
        con.register("_l", lines)
        con.execute("create table marts.customer_scores_history as select * from _h")
        con.execute(
            "create table marts.scoring_set as select customer_id,"
            + ", ".join(f"1.0::double as {f}" for f in monitoring.DRIFT_FEATURES)
            + " from _h where scoring_run_id = 'run-b'"
        )
        con.execute(
            "create table intermediate.int_order_lines_enriched as"
            " select customer_id, ordered_on::date as ordered_on, is_purchase, is_merchandise"
            " from _l"
        )
        # d bought nothing, and people say d did not churn (moved to another account).
        con.execute(
            "create table marts.label_corrections as select 'f1' as feedback_id,"
            " 'd' as customer_id, 'is_churned' as label, 'false' as corrected_value,"
            " date '2024-12-01' as valid_from, date '9999-12-31' as valid_to,"
            " timestamp '2025-02-01' as submitted_at"
        )
        # c was sent a campaign during the horizon; a's treatment ended before it began.
        con.execute(
            "create table intermediate.int_campaign_results as select * from (values"
            " ('c', 'treatment', timestamp '2025-01-10', timestamp '2025-02-09'),"
            " ('a', 'treatment', timestamp '2024-11-01', timestamp '2024-12-01'),"
            " ('b', 'control', timestamp '2025-01-10', timestamp '2025-02-09'))"
            " as t(customer_id, group_name, assigned_at, window_end)"
        )
        first = monitoring.record(con, "run-b", 90, reference={}, reference_name="none")
        second = monitoring.record(con, "run-c", 90, reference={}, reference_name="none")
        stored = con.execute("select * from monitoring.champion_performance").df()
    row = first["champion_performance"].squeeze()
    assert row["scored_run_id"] == "run-a-again" and row["customers"] == 4
    assert row["churn_rate"] == pytest.approx(0.25)  # b alone: d's correction counts
    assert row["corrected_labels"] == 1
    assert row["churn_roc_auc"] == pytest.approx(1.0)  # 0.5 with d counted as churned
    assert row["lapsed_accuracy"] == pytest.approx(0.75)
    assert row["untreated_customers"] == 3
    assert len(stored) == 1 and stored.at[0, "scoring_run_id"] == "run-c"
    assert (
        second["champion_performance"]
        .drop(columns="scoring_run_id")
        .equals(first["champion_performance"].drop(columns="scoring_run_id"))
    )


def test_the_market_keeps_its_truth_apart_and_plays_each_window_once(tmp_path: Path) -> None:
    shop = tmp_path / "shop"
    generate(shop, SimulationConfig(customers=1500, seed=5))
    truth = pd.read_parquet(shop / "latent" / "customer_truth.parquet")
    start = datetime(2026, 1, 1)
    costs = {"win_back_offer": 0.5, "vip_perk": 2.0}
    profit = market.expected_incremental_profit(
        shop, truth["customer_id"], list(costs), start, 30, 0.35, costs
    )
    by_type = profit.groupby(truth["customer_type"].to_numpy()).mean()
    # A discount to loyal buyers who buy anyway gives the discount away, whole: the goods
    # cost what they cost. Bargain hunters respond.
    window = market.expectation(shop, truth["customer_id"], start, 30)
    loyal = (truth["customer_type"] == "loyal_high_value").to_numpy() & window.active
    given = 0.15 * window.order_value * window.base_orders
    assert np.allclose(profit["win_back_offer"][loyal], -given[loyal] - 0.5)
    assert by_type.loc["loyal_high_value", "win_back_offer"] < 0
    # It pays where it brings back customers drifting away who had stopped buying.
    stopped = (truth["customer_type"] == "drifting_away").to_numpy() & ~window.active
    assert profit["win_back_offer"][stopped].mean() > 0
    assert by_type.loc["loyal_high_value", "vip_perk"] > 0
    # Unsubscribes are charged where the truth has them: a delivered message, then its rate.
    email = {"nurture_email": 0.2}
    args = (shop, truth["customer_id"], list(email), start, 30, 0.35, email)
    charge = market.expected_incremental_profit(*args) - market.expected_incremental_profit(
        *args, unsubscribe_cost=10.0
    )
    charge = charge["nurture_email"].groupby(truth["customer_type"].to_numpy()).mean()
    assert charge["one_off"] == pytest.approx(10.0 * market.P_DELIVERED * 0.04)
    assert charge["regular"] == 0.0
    chosen = truth.head(300)
    plan = pd.DataFrame(
        {
            "campaign_id": "cmp-x",
            "customer_id": chosen["customer_id"],
            "customer_key": [f"key{i}" for i in range(len(chosen))],
            "action": "win_back_offer",
            "group_name": np.where(np.arange(len(chosen)) % 10 == 0, "control", "treatment"),
        }
    )
    truth_before = pd.read_parquet(shop / "latent" / "customer_truth.parquet")
    window = market.advance(shop, plan, start, 30, tmp_path / "outcomes", 5)
    events = pd.read_csv(window.outcomes_file)
    assert set(events["customer_key"]) <= set(
        plan.loc[plan.group_name == "treatment", "customer_key"]
    )
    assert set(events["event"]) <= {"delivered", "opened", "clicked", "converted", "unsubscribed"}
    lines = pd.read_parquet(shop / "order_lines" / "window-20260101.parquet")
    assert lines["invoiced_at"].min() >= pd.Timestamp(start)
    assert lines["invoiced_at"].max() < pd.Timestamp("2026-01-31")
    assert window.order_lines == len(lines) > 0
    truth = pd.read_parquet(shop / "latent" / "campaigns" / "cmp-x.parquet")
    assert len(truth) == len(plan) and "expected_incremental_revenue_vip_perk" in truth
    with pytest.raises(ValueError, match="already played campaign cmp-x"):
        market.advance(shop, plan, start, 30, tmp_path / "outcomes", 5)
    # Another campaign over days already played would draw them again: refused.
    with pytest.raises(ValueError, match="inside the window the market already played for"):
        market.advance(
            shop, plan.assign(campaign_id="cmp-w"), start + timedelta(29), 30, tmp_path / "o", 5
        )
    assert market.played(shop, "cmp-w") is None
    # A rerun of the loop after a later step failed carries on from the window played.
    assert market.played(shop, "cmp-x") == window
    assert market.played(shop, "cmp-y") is None
    # The B2B account team: customers who stopped buying here because they moved to the B2B
    # account did not churn, from their last order here on; its first file has the year's moves.
    moved = pd.read_csv(window.corrections_file, dtype=str, keep_default_na=False)
    assert window.corrections == len(moved) > 0
    assert window.corrections_file.parent.name == "label_feedback"
    assert market.moved_to_b2b(5, moved["customer_id"]).all()
    assert set(moved["label"]) == {"is_churned"} and set(moved["corrected_value"]) == {"false"}
    assert set(moved["valid_to"]) == {""} and moved["feedback_id"].is_unique
    after = pd.read_parquet(shop / "latent" / "customer_truth.parquet").set_index("customer_id")
    # a customer won back by the campaign has no dropout now; before it, the one listed
    last_order = after["dropped_out_at"].fillna(
        truth_before.set_index("customer_id")["dropped_out_at"]
    )
    assert list(last_order[moved["customer_id"]].dt.strftime("%Y-%m-%d")) == list(
        moved["valid_from"]
    )
    assert moved["valid_from"].min() >= "2025-01-01" and moved["valid_from"].max() <= "2026-01-31"
    dropped = last_order[last_order >= "2025-01-01"].index
    assert set(moved["customer_id"]) == set(dropped[market.moved_to_b2b(5, dropped)])
    # Later files list only their window's moves.
    later = market.advance(
        shop, plan.assign(campaign_id="cmp-z"), start + timedelta(30), 30, tmp_path / "outcomes", 5
    )
    now = pd.read_parquet(shop / "latent" / "customer_truth.parquet").set_index("customer_id")
    left = now.index[now["dropped_out_at"] >= "2026-01-31"]
    expected = set(left[market.moved_to_b2b(5, left)])
    assert later.corrections == len(expected)
    if expected:
        again = pd.read_csv(later.corrections_file, dtype=str)
        assert set(again["customer_id"]) == expected and again["valid_from"].min() >= "2026-01-31"


def test_the_demo_runs_the_loop_end_to_end(pipeline_run: Settings) -> None:
    """`valueloop run` played two cycles: campaigns, outcomes, performance, monitoring."""
    settings = pipeline_run
    output = (settings.home / "run-output.txt").read_text()
    assert "cycle 1: campaign" in output and "cycle 2: campaign" in output
    assert "retraining:" in output and "uplift" in output
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        planned = con.execute("select count(*) from marts.campaigns").fetchone()[0]
        measured = con.execute(
            "select campaign_id, sum(treated), sum(control) from marts.campaign_performance"
            " where segment_name = 'all' group by 1 order by 1"
        ).fetchall()
        assigned = dict(
            con.execute(
                "select campaign_id, count(*) from marts.campaign_assignments group by 1"
            ).fetchall()
        )
        batches = con.execute(
            "select rows_read, rows_accepted, rows_quarantined from raw.ingest_batches"
            " where entity = 'campaign_outcomes'"
        ).fetchall()
        policies = con.execute(
            "select distinct action_policy from marts.customer_scores"
        ).fetchall()
        drift = con.execute("select count(distinct scoring_run_id) from monitoring.feature_drift")
        drift_runs = drift.fetchone()[0]
        references = con.execute(
            "select distinct reference from monitoring.feature_drift"
        ).fetchall()
        migration = con.execute("select sum(customers) from monitoring.tier_migration").fetchone()
        scored = con.execute("select count(*) from marts.customer_scores").fetchone()[0]
        label_batches = con.execute(
            "select rows_read, rows_accepted from raw.ingest_batches"
            " where entity = 'label_feedback'"
        ).fetchall()
        sent = con.execute("select count(*), min(source) from raw.label_feedback").fetchone()
        followed = con.execute(
            "select count(*), count(*) filter (where is_churned),"
            " count(*) filter (where derived_value_tier = 'lapsed') from marts.customer_labels"
            " where label_source like 'feedback:b2b-%'"
        ).fetchone()
        cells = con.execute(
            "select treated, control, conversion_treated, conversion_control, uplift,"
            " uplift_ci_low, uplift_ci_high from marts.campaign_performance"
            " where treated > 0 and control > 0"
        ).df()
        # A discount is charged whole: (1 - margin) x d / (1 - d) of the treated revenue more
        # than margin x the revenue it moved.
        profits = con.execute(
            "select performance.action, discount, revenue_per_treated * treated as revenue,"
            " discount_cost, incremental_profit, incremental_revenue, contact_cost,"
            " unsubscribe_rate * treated as unsubscribed"
            " from marts.campaign_performance as performance"
            " inner join reference.campaign_actions using (action)"
            " where segment_name = 'all' and treated > 0 and control > 0"
        ).df()
    # The uplift's interval is Agresti-Caffo's: a group where nobody (or everybody) bought
    # still has a spread, so a cell of a few controls none of whom bought is no clear win.
    adjusted = [
        (cells[f"conversion_{g}"] * cells[n] + 1) / (cells[n] + 2)
        for g, n in (("treated", "treated"), ("control", "control"))
    ]
    groups = zip(adjusted, ("treated", "control"), strict=True)
    half = 1.959964 * np.sqrt(sum(a * (1 - a) / (cells[n] + 2) for a, n in groups))
    assert len(cells) > 10
    assert np.allclose(cells["uplift_ci_low"], adjusted[0] - adjusted[1] - half)
    assert np.allclose(cells["uplift_ci_high"], adjusted[0] - adjusted[1] + half)
    none_bought = cells[cells["conversion_control"] == 0]
    wald = 1.959964 * np.sqrt(
        none_bought["conversion_treated"]
        * (1 - none_bought["conversion_treated"])
        / none_bought["treated"]
    )
    assert (none_bought["uplift_ci_high"] - none_bought["uplift_ci_low"] > 2 * wald).all()
    margin = pipeline_run.margin_rate
    charged = (1 - margin) * profits["discount"] / (1 - profits["discount"]) * profits["revenue"]
    assert (profits["discount"] > 0).any() and (profits["discount"] == 0).any()
    assert np.allclose(profits["discount_cost"], charged)
    assert np.allclose(
        profits["incremental_profit"],
        margin * profits["incremental_revenue"]
        - charged
        - profits["contact_cost"]
        - pipeline_run.unsubscribe_cost * profits["unsubscribed"],
    )
    assert planned == 3  # the first scoring's campaign and one after each cycle
    assert len(measured) == 2
    for campaign_id, treated, control in measured:
        assert treated + control == assigned[campaign_id]
    assert len(batches) == 2 and all(r == a + q for r, a, q in batches)
    assert len(policies) == 1  # one policy chose every row of a scoring run
    assert policies[0][0] == "playbook" or policies[0][0].startswith("uplift-v")
    assert drift_runs >= 3 and migration[0] >= scored
    # The demo market's B2B account team sent label corrections; they reached the labels.
    assert label_batches and all(read == accepted for read, accepted in label_batches)
    assert sent[0] > 0 and sent[1] == market.B2B_SOURCE
    assert "label corrections: " in output and market.B2B_REASON in output
    corrected, churned, derived_lapsed = followed
    assert corrected > 0 and churned == 0 and derived_lapsed > 0
    # drift is measured against what the champion was trained on, logged with its training run
    client = MlflowClient(settings.mlflow_tracking_uri)
    for (reference,) in references:
        assert reference.startswith("champion v"), reference
        run = reference.split("(run ")[1].rstrip(")")
        assert monitoring.REFERENCE_ARTIFACT in {a.path for a in client.list_artifacts(run)}
    assert list((settings.campaigns_dir).glob("*.csv")) and list(
        (settings.home / "reports").glob("*_monitoring.html")
    )


# The registered uplift model, loaded where the platform is not installed: any import of
# `valueloop` fails. (`ml` itself is importable here from this checkout's install as well as
# from the model's code_paths, so this proves the model needs no `valueloop`, not which copy
# of `ml` it ran.)
_LOAD_WITHOUT_PLATFORM = """
import sys

class NoPlatform:
    def find_spec(self, name, path=None, target=None):
        if name == "valueloop" or name.startswith("valueloop."):
            raise ModuleNotFoundError(f"no module named {name!r}: the platform is not here")
        return None

sys.meta_path.insert(0, NoPlatform())
import mlflow
import pandas as pd

mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/valueloop-uplift-model@champion")
model.predict(pd.read_parquet(sys.argv[2])).to_parquet(sys.argv[3])
"""


def test_the_uplift_model_passes_mlflow_and_its_gate_and_scoring_follows_it(
    pipeline_run: Settings, tmp_path: Path
) -> None:
    """On the demo run's randomised outcomes: the uplift model is tracked, registered and
    gated in MLflow, loads from the registry alone, and the next scoring run's actions are
    the ones its rule picks (dbt's scored_customers, checked against ml.uplift.choose)."""
    home = tmp_path / "home"
    shutil.copytree(
        pipeline_run.home, home, symlinks=True, ignore=shutil.ignore_patterns("airflow", "logs")
    )
    env = {"VALUELOOP_PII_SALT": "s", "VALUELOOP_UPLIFT_MIN_OUTCOMES": "100"}
    settings = load_settings(env=env, home=home)
    read = "select customer_id, value_tier, churn_risk_band, segment_id, next_best_action,"
    read += " action_policy, model_version from marts.customer_scores order by customer_id"
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        before = con.execute(read).df()
    # Two cycles of the demo are fewer outcomes than the default 2,000: the playbook decided.
    assert set(before["action_policy"]) == {"playbook"}

    first = pipeline.train_uplift(settings, "test")
    client = MlflowClient(settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(uplift.UPLIFT_EXPERIMENT)

    def gate_figures(reason: str) -> tuple[float, float, float, int]:
        [run] = client.search_runs(
            [experiment.experiment_id], f"tags.valueloop.retrain_reason = '{reason}'"
        )
        named = ("gate_policy_lead", "gate_policy_lead_low", "gate_policy_lead_high")
        switched = int(run.data.metrics["gate_switched_customers"])
        # a lead or a bound that is not a number is not logged
        return (*(run.data.metrics.get(k, float("nan")) for k in named), switched)

    # The first model is weighed against the playbook on the published scores' customers:
    # the default gate (a guardrail) refuses it only on a loss beyond the noise (the point
    # estimate decides where there is no interval). What MLflow logged is what decided.
    lead, _, high, switched = gate_figures("test")
    upper = high if np.isfinite(high) else lead
    assert first["trained"] and first["promoted"] == (switched == 0 or upper >= 0), first
    if first["promoted"]:
        assert first["champion"] == "1"
        assert "over the playbook on held-out randomised outcomes" in first["reason"] or (
            "the same action as the playbook" in first["reason"]
        )
    else:
        assert first["reason"].endswith("the playbook stays") and first["champion"] is None
        assert uplift.champion_version(settings.mlflow_tracking_uri) is None
        # A data scientist may promote it anyway, as any registered model.
        promoted = run_valueloop(
            "promote", "--model", uplift.UPLIFT_MODEL, "--version", "1", home=home
        )
        assert promoted.returncode == 0, promoted.stderr[-2000:]
    assert uplift.champion_version(settings.mlflow_tracking_uri) == "1"
    # Asked for a gain beyond the noise, the same data's challenger against the champion:
    # the champion is the same learner on every outcome, the challenger on four fifths. The
    # champion learned from every campaign there is, so no held-out outcome can weigh it
    # fairly, and nothing is promoted on them.
    strict = load_settings(env=env | {"VALUELOOP_UPLIFT_GATE": "superiority"}, home=home)
    again = pipeline.train_uplift(strict, "test again")
    lead, _, _, switched = gate_figures("test again")
    assert again["trained"] and not again["promoted"], again
    assert again["reason"].endswith("champion v1 stays") and again["champion"] == "1"
    if switched:
        assert np.isnan(lead) and "a campaign champion v1 did not learn from" in again["reason"]
    # The decision says what the lead was measured on: nothing, as the champion learned from
    # every campaign measured so far.
    [run] = client.search_runs(
        [experiment.experiment_id], "tags.valueloop.retrain_reason = 'test again'"
    )
    logged = client.download_artifacts(run.info.run_id, "gate_decision.json", str(tmp_path))
    decision = json.loads(Path(logged).read_text())
    measured_campaigns = sorted(set(uplift.load_outcomes(settings.warehouse_path)["campaign_id"]))
    assert decision["champion_learned_from"] == measured_campaigns
    assert decision["weighed_on_campaigns"] == []
    champion = again["champion"]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    assert {r.data.tags["valueloop.retrain_reason"] for r in runs} == {"test", "test again"}
    assert {r.data.params["gate"] for r in runs} == {"guardrail", "superiority"}
    for run in runs:
        assert "qini_mean" in run.data.metrics
        assert "gate_switched_customers" in run.data.metrics
        assert any(name.startswith("auuc_") for name in run.data.metrics)
        assert any(name.startswith("unsubscribe_rate_") for name in run.data.metrics)
        assert "plots/qini_curves.png" in {
            a.path for a in client.list_artifacts(run.info.run_id, "plots")
        }

    features = uplift.load_outcomes(settings.warehouse_path)[list(uplift.FEATURES)]
    features = features.head(50).astype("float64")
    features.to_parquet(tmp_path / "features.parquet")
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD_WITHOUT_PLATFORM,
            settings.mlflow_tracking_uri,
            str(tmp_path / "features.parquet"),
            str(tmp_path / "effects.parquet"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    model, version = uplift.load_champion(settings.mlflow_tracking_uri)
    assert version == champion
    # The market's unsubscribes came through the outcome files and the marts into the model:
    # every one the activation tool reported is an outcome, and the registered model's rates
    # are the treated customers' shares over every outcome (it is refitted on all of them;
    # how many there are is up to the market's draws on a shop this small).
    reported = sum(
        int((pd.read_csv(f)["event"] == "unsubscribed").sum())
        for f in (settings.feedback_dir / "campaign_outcomes").glob("*.csv")
    )
    outcomes = uplift.load_outcomes(settings.warehouse_path)
    assert int(outcomes["unsubscribed"].sum()) == reported
    fitted = outcomes
    arms = uplift.arm(fitted)
    sent = np.isin(arms, model.arms) & (arms != uplift.CONTROL)
    shares = fitted.loc[sent, "unsubscribed"].astype("float64").groupby(arms[sent]).mean()
    assert model.unsubscribe_overall == pytest.approx(shares.to_dict())
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "effects.parquet"), uplift.predict_frame(model, features)
    )

    result = run_valueloop("score", home=home)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        after = con.execute(read).df()
        candidates = con.execute("select * from scoring.candidate_uplift").df()
    assert set(after["action_policy"]) == {f"uplift-v{champion}"}
    # The same customer champion scored the same marts: same tiers, bands and segments, so
    # the playbook's action is the one published before.
    same = ["customer_id", "value_tier", "churn_risk_band", "segment_id", "model_version"]
    pd.testing.assert_frame_equal(before[same], after[same])
    wide = candidates.pivot(index="customer_id", columns="action").reindex(after["customer_id"])
    options = sorted(candidates["action"].unique())
    actions = campaigns.load_actions(settings)
    eligible = [
        campaigns.eligible_actions(actions, tier, band)
        for tier, band in zip(after["value_tier"], after["churn_risk_band"], strict=True)
    ]
    expected, _ = uplift.choose(
        wide["expected_incremental_profit"][options].reset_index(drop=True),
        dict.fromkeys(options, 0.0),  # the candidates' profits are net of cost already
        1.0,
        eligible,
        before["next_best_action"].to_numpy(object),
        wide["profit_std_error"][options].reset_index(drop=True),
        settings.uplift_confidence_z,
        wide["profit_shared_std_error"][options].reset_index(drop=True),
        {a for a, x in actions.items() if x.discount == 0},
    )
    assert list(after["next_best_action"]) == list(expected)
    assert (after["next_best_action"] != before["next_best_action"]).any()
    # A campaign on these scores: each customer's expected incremental profit is the model's
    # estimate of the action they were given, an explored one's too (not their policy's).
    campaigns.plan(settings, "cmp-estimates")
    rows = assignments(settings, "cmp-estimates")
    salt = settings.resolve_pii_salt()
    candidates["customer_key"] = [
        campaigns.customer_key(salt, c) for c in candidates["customer_id"]
    ]
    joined = rows.merge(candidates, on=["customer_key", "action"], suffixes=("", "_model"))
    assert len(joined) == len(rows) and (rows["policy"] == campaigns.EXPLORE).any()
    np.testing.assert_allclose(
        joined["expected_incremental_profit"], joined["expected_incremental_profit_model"]
    )


def test_valueloop_loop_turns_the_loop_with_a_line_per_cycle(
    pipeline_run: Settings, tmp_path: Path
) -> None:
    """`valueloop loop --cycles 1` on the demo run's data folder: the campaign the run planned
    is measured and the next one planned; the terminal shows the cycle's line and what it
    measured, and the tools' output (GX, dbt, MLflow, their progress bars) goes to a log."""
    home = tmp_path / "home"
    shutil.copytree(
        pipeline_run.home, home, symlinks=True, ignore=shutil.ignore_patterns("airflow", "logs")
    )
    settings = load_settings(env={"VALUELOOP_PII_SALT": "s"}, home=home)
    read = "select campaign_id from marts.campaigns order by campaign_id"
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        before = [r[0] for r in con.execute(read).fetchall()]
    tiny = {"VALUELOOP_TRAIN_CONFIG": str(REPO_ROOT / "ml" / "configs" / "tiny.yaml")}
    result = run_valueloop("loop", "--cycles", "1", home=home, timeout=900, env=tiny)
    shown = result.stdout + result.stderr
    assert result.returncode == 0, shown[-6000:]
    # Numbered on from the run's cycles: the data folder's n-th campaign is its cycle n.
    assert f"loop cycle {len(before)}" in result.stdout
    assert f"cycle {len(before)}: campaign {before[-1]}" in result.stdout
    assert "retraining:" in result.stdout and "next: cmp-" in result.stdout
    assert "Calculating Metrics" not in shown and "WARNING" not in shown, shown[-3000:]
    [log] = (home / "logs").glob("loop-*/valueloop.log")
    assert "Calculating Metrics" in log.read_text()  # GX's progress, kept out of sight
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        after = [r[0] for r in con.execute(read).fetchall()]
        measured = con.execute(
            "select count(*) from marts.campaign_performance where campaign_id = ?", [before[-1]]
        ).fetchone()[0]
    assert after[: len(before)] == before and len(after) == len(before) + 1
    assert measured > 0


def test_a_feedback_batch_past_the_threshold_requests_retraining_through_airflow(
    pipeline_run: Settings, tmp_path: Path
) -> None:
    """`airflow dags test ingest_feedback`: corrections below the threshold request nothing;
    a batch that takes them past it updates the retrain asset with the reason."""
    home = tmp_path / "home"
    shutil.copytree(pipeline_run.home, home, ignore=shutil.ignore_patterns("airflow", "logs"))
    env = {"VALUELOOP_PII_SALT": "s"}
    env |= {"VALUELOOP_RETRAIN_MIN_OUTCOMES": "1000000", "VALUELOOP_RETRAIN_DRIFT_PSI": "100"}
    # The demo market's B2B account team sent corrections in the run's loop that no training
    # has seen yet: the threshold is four more than those.
    facts = retraining.decide(load_settings(env=env, home=home)).facts
    pending = facts["label_corrections"] - facts["corrections_trained_on"]
    env["VALUELOOP_RETRAIN_MIN_CORRECTIONS"] = str(pending + 4)
    settings = load_settings(env=env, home=home)
    orchestration.bootstrap(settings)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        rows = con.execute("select customer_id from raw.customers order by 1 limit 6").fetchall()
        customers = [r[0] for r in rows]
    folder = settings.feedback_dir / "label_feedback"
    folder.mkdir(parents=True, exist_ok=True)

    def corrections(name: str, ids: list[str]) -> None:
        pd.DataFrame(
            {
                "feedback_id": [f"{name}-{c}" for c in ids],
                "customer_id": ids,
                "label": "is_churned",
                "corrected_value": "false",
                "valid_from": "2024-01-01",
                "source": "account team",
                "submitted_at": "2026-01-05 09:00:00",
            }
        ).to_csv(folder / f"{name}.csv", index=False)

    def run_feedback_dag(day: str) -> list[dict]:
        result = subprocess.run(
            [orchestration.airflow_cli(), "dags", "test", "ingest_feedback", day],
            env=orchestration.airflow_env(settings),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        with sqlite3.connect(settings.airflow_home / "airflow.db") as db:
            rows = db.execute(
                "select e.extra from asset_event e join asset a on a.id = e.asset_id"
                " where a.name = 'valueloop_retrain_request' order by e.id"
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    corrections("first", customers[:2])
    assert run_feedback_dag("2026-01-05T10:00:00+00:00") == []  # 2 < 4 more: nothing requested
    corrections("second", customers[2:5])
    (event,) = run_feedback_dag("2026-01-05T10:10:00+00:00")  # 5 >= 4 more
    assert event["uplift_model"] == []
    assert event["customer_model"] == [
        f"{pending + 5} new label corrections (threshold {pending + 4})"
    ]
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        sources = con.execute(
            "select count(*) from marts.customer_labels where label_source similar to"
            " 'feedback:(first|second)-.*'"
        ).fetchone()[0]
    assert sources > 0  # these corrections reached the label marts through dbt
    # Corrections ingested but never built, as a dbt_feedback that failed leaves them: the
    # next run, with no new file, builds them.
    corrections("third", customers[5:6])
    report = jobs.ingest_path(settings, folder / "third.csv", "feedback")
    assert report.rows_accepted == 1
    events = run_feedback_dag("2026-01-05T10:20:00+00:00")
    assert events[-1]["customer_model"] == [
        f"{pending + 6} new label corrections (threshold {pending + 4})"
    ]
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        caught_up = con.execute(
            "select count(*) from marts.customer_labels where label_source like 'feedback:third-%'"
        ).fetchone()[0]
    assert caught_up > 0


def test_retraining_fires_on_drift_on_schedule_and_on_new_outcomes_each_past_its_threshold(
    pipeline_run: Settings,
) -> None:
    """`retraining.decide` on the demo run's real warehouse and MLflow store: each trigger fires
    at its threshold and not just above it, and names what fired it."""
    with duckdb.connect(str(pipeline_run.warehouse_path), read_only=True) as con:
        latest = con.execute(
            "select scoring_run_id from monitoring.feature_drift order by computed_at desc limit 1"
        ).fetchone()[0]
        features = con.execute(
            "select feature, psi from monitoring.feature_drift where scoring_run_id = ?"
            " and not isnan(psi)",
            [latest],
        ).fetchall()
        scores = con.execute(
            "select 'score ' || score, psi from monitoring.score_drift where scoring_run_id = ?"
            " and not isnan(psi) and (select count(distinct model_version)"
            " from marts.customer_scores_history where scoring_run_id in (?, previous_run_id)) = 1",
            [latest, latest],
        ).fetchall()
    largest = max(features + scores, key=lambda r: r[1])
    quiet = {
        "VALUELOOP_PII_SALT": "s",
        "VALUELOOP_RETRAIN_MIN_CORRECTIONS": "1000000",
        "VALUELOOP_RETRAIN_MIN_OUTCOMES": "1000000",
        "VALUELOOP_RETRAIN_EVERY_DAYS": "7",
        "VALUELOOP_RETRAIN_DRIFT_PSI": "100",
    }

    def decide(now: datetime | None = None, **env: str):
        settings = load_settings(env=quiet | env, home=pipeline_run.home)
        return retraining.decide(settings, now)

    assert decide().customer_model == [] and decide().uplift_model == []
    # drift: the largest PSI of the latest run, over features and scores
    at = decide(VALUELOOP_RETRAIN_DRIFT_PSI=repr(largest[1]))
    assert at.facts["largest_psi_of"] == largest[0]
    assert [r for r in at.customer_model if r.startswith("drift")] == [
        f"drift: PSI {largest[1]:.3f} of {largest[0]} (threshold {largest[1]!r})"
    ]
    above = decide(VALUELOOP_RETRAIN_DRIFT_PSI=str(largest[1] + 0.001))
    assert not [r for r in above.customer_model if r.startswith("drift")]
    # schedule: the customer model's last training run, eight days later and one day later
    client = MlflowClient(pipeline_run.mlflow_tracking_uri)
    name = TrainConfig.load(pipeline_run.train_config).experiment
    experiment = client.get_experiment_by_name(name)
    (last,) = client.search_runs(
        [experiment.experiment_id],
        "tags.`valueloop.kind` = 'training'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    started = datetime.fromtimestamp(last.info.start_time / 1000, UTC)
    late = decide(now=started + timedelta(days=8)).customer_model
    assert len(late) == 1 and late[0].startswith("schedule: last trained 8.0 days ago")
    assert decide(now=started + timedelta(days=1)).customer_model == []
    # new outcomes since the uplift model last trained: at the threshold, and one short of it
    facts = decide().facts
    assert facts["matured_outcomes"] > 0
    new = facts["matured_outcomes"] - facts["uplift_trained_on"]
    fired = decide(VALUELOOP_RETRAIN_MIN_OUTCOMES=str(new), VALUELOOP_UPLIFT_MIN_OUTCOMES="0")
    assert fired.uplift_model == [f"{new:,} new randomised outcomes (threshold {new:,})"]
    short = decide(VALUELOOP_RETRAIN_MIN_OUTCOMES=str(new + 1), VALUELOOP_UPLIFT_MIN_OUTCOMES="0")
    assert short.uplift_model == []


def test_a_drift_that_a_retraining_answered_fires_again_only_when_measured_again(
    pipeline_run: Settings, tmp_path: Path
) -> None:
    """A drift-triggered challenger that loses its gate changes nothing, so the latest
    monitoring row stays: without memory, every later decision would retrain on it again."""
    home = tmp_path / "home"
    home.mkdir()
    for name in ("warehouse.duckdb", "mlflow.db"):  # a copy: the session's run stays as it is
        shutil.copy(pipeline_run.home / name, home / name)
    settings = load_settings(env={"VALUELOOP_PII_SALT": "s"}, home=home)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        largest = retraining._largest_drift(con)
    assert largest is not None
    env = {
        "VALUELOOP_PII_SALT": "s",
        "VALUELOOP_TRAIN_CONFIG": str(pipeline_run.train_config),
        "VALUELOOP_RETRAIN_DRIFT_PSI": repr(largest[1]),
    }
    settings = load_settings(env=env, home=home)

    def drifted() -> list[str]:
        return [r for r in retraining.decide(settings).customer_model if r.startswith("drift")]

    assert drifted()
    client = MlflowClient(settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(TrainConfig.load(settings.train_config).experiment)
    # A training run that crashed trained nothing: the drift still stands.
    crashed = client.create_run(experiment.experiment_id, tags={"valueloop.kind": "training"})
    client.set_terminated(crashed.info.run_id, status="FAILED")
    assert drifted()
    # A training run starts after the drift was measured (and, say, loses its gate).
    run = client.create_run(experiment.experiment_id, tags={"valueloop.kind": "training"})
    client.set_terminated(run.info.run_id)
    assert drifted() == []
    # A later scoring run measures the drift again: it fires again.
    with duckdb.connect(str(settings.warehouse_path)) as con:
        con.execute(
            "update monitoring.feature_drift set computed_at = ? where scoring_run_id ="
            " (select scoring_run_id from monitoring.feature_drift order by computed_at desc"
            " limit 1)",
            [datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=1)],
        )
    assert drifted()


def test_the_market_answers_the_exported_campaign_file_and_never_hears_of_the_controls(
    pipeline_run: Settings, tmp_path: Path
) -> None:
    """`valueloop campaign simulate --file`: the demo market reads the activation tool's file
    (treated customers only) and answers it; a missing file is named in the error."""
    from valueloop.loop import latest_campaign, simulate_campaign

    home = tmp_path / "home"
    shutil.copytree(pipeline_run.home, home, ignore=shutil.ignore_patterns("airflow", "logs"))
    settings = load_settings(env={"VALUELOOP_PII_SALT": "s"}, home=home)
    campaign_id = latest_campaign(settings)
    exported = settings.campaigns_dir / f"{campaign_id}.csv"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.csv"):
        simulate_campaign(settings, campaign_id, tmp_path / "nowhere.csv")
    # A key the market cannot place (another salt, another shop) stops it before it plays.
    stray = tmp_path / f"{campaign_id}-stray.csv"
    keys = pd.read_csv(exported)
    keys.loc[0, "customer_key"] = "not-a-key"
    keys.to_csv(stray, index=False)
    with pytest.raises(ValueError, match=r"1 of [\d,]+ customer_key values match no customer"):
        simulate_campaign(settings, None, stray)
    window = simulate_campaign(settings, None, exported)  # the file names its campaign
    assert window.outcomes_file.name == f"{campaign_id}.csv"
    sent = pd.read_csv(exported)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        controls = {
            r[0]
            for r in con.execute(
                "select customer_key from marts.campaign_assignments"
                " where campaign_id = ? and group_name = 'control'",
                [campaign_id],
            ).fetchall()
        }
    assert controls and not controls & set(sent["customer_key"])
    events = pd.read_csv(window.outcomes_file)
    assert len(events) and set(events["customer_key"]) <= set(sent["customer_key"])
    truth = pd.read_parquet(settings.demo_dir / "latent" / "campaigns" / f"{campaign_id}.parquet")
    assert sorted(truth["customer_key"]) == sorted(sent["customer_key"])
    assert (truth["group_name"] == "treatment").all()


def test_feedback_never_built_is_counted_and_nothing_before_the_first_ingest(
    tmp_path: Path,
) -> None:
    settings = load_settings(env={"VALUELOOP_PII_SALT": "s"}, home=tmp_path)
    # The feedback DAG asks every 10 minutes, before anything was ever loaded: nothing, and no
    # warehouse made for it.
    assert transform.feedback_unbuilt(settings) == 0
    assert not settings.warehouse_path.exists()
    settings.ensure_dirs()
    with duckdb.connect(str(settings.warehouse_path)) as con:
        ensure_raw_schema(con)
    assert transform.feedback_unbuilt(settings) == 0


def test_a_scheduled_run_with_nothing_new_does_not_rebuild_the_marts(tmp_path: Path) -> None:
    """`ingest_and_transform` goes past ingest on a schedule only for new data: a file read, or
    shop data loaded and never built (a run whose build failed); a run someone triggered
    always goes on. Feedback batches are the feedback DAG's, not the marts build's."""
    settings = load_settings(env={"VALUELOOP_PII_SALT": "s"}, home=tmp_path)
    assert (
        transform.marts_unbuilt(settings) == 0 and transform.shop_loaded_through(settings) is None
    )
    settings.ensure_dirs()

    def load(batch: str, entity: str, at: str) -> None:
        con.execute(
            "insert into raw.ingest_batches values (?, 'f.csv', ?, ?, 'csv', 1, 1, 0, ?)",
            [batch, batch, entity, at],
        )

    with duckdb.connect(str(settings.warehouse_path)) as con:
        ensure_raw_schema(con)
        load("b1", "customers", "2026-01-01 10:00")
        load("b2", "order_lines", "2026-01-01 10:00")
    assert transform.marts_unbuilt(settings) == 2  # never built
    through = transform.shop_loaded_through(settings)
    assert through == "2026-01-01T10:00:00"
    transform.record_marts_build(settings, through)
    assert transform.marts_unbuilt(settings) == 0
    with duckdb.connect(str(settings.warehouse_path)) as con:
        load("f1", "label_feedback", "2026-01-02 10:00")  # the feedback DAG builds it
    assert transform.marts_unbuilt(settings) == 0
    with duckdb.connect(str(settings.warehouse_path)) as con:
        load("b3", "order_lines", "2026-01-03 10:00")  # loaded; its build then failed
    assert transform.marts_unbuilt(settings) == 1
    from airflow.sdk.api.datamodels._generated import DagRunType  # what the task context has

    nothing = {"read": 0, "unbuilt": 0}
    assert not pipeline.marts_need_building(nothing, DagRunType.SCHEDULED)
    assert pipeline.marts_need_building(nothing | {"unbuilt": 1}, DagRunType.SCHEDULED)
    assert pipeline.marts_need_building(nothing | {"read": 10}, DagRunType.SCHEDULED)
    assert pipeline.marts_need_building(nothing, DagRunType.MANUAL)
    assert pipeline.marts_need_building(nothing, DagRunType.ASSET_TRIGGERED)


def test_a_queued_request_trains_only_what_still_fires_and_a_manual_run_both() -> None:
    now = retraining.RetrainDecision(["drift: PSI 0.31 of recency_days (threshold 0.25)"], [])
    asked = {"customer_model": ["drift: PSI 0.31 of recency_days (threshold 0.25)"]}
    asked |= {"uplift_model": ["1,200 new randomised outcomes (threshold 1,000)"]}
    # The uplift training that ran since answered its request; the drift still fires.
    assert retraining.plan(asked, now, "asset_triggered", None) == {
        "customer_model": now.customer_model,
        "uplift_model": [],
    }
    answered = retraining.RetrainDecision([], [])
    assert retraining.plan(asked, answered, "asset_triggered", None) == {
        "customer_model": [],
        "uplift_model": [],
    }
    # Only what was asked for, even when another trigger fires now.
    only_uplift = {"customer_model": [], "uplift_model": ["schedule"]}
    assert retraining.plan(only_uplift, now, "asset_triggered", None)["customer_model"] == []
    given = {"customer_model": ["no champion yet"], "uplift_model": []}
    assert retraining.plan({}, None, "manual", given) == given
    assert retraining.plan({}, None, "manual", {}) == {
        "customer_model": ["manual run"],
        "uplift_model": ["manual run"],
    }
    assert retraining.plan({}, None, "scheduled", None)["uplift_model"] == ["schedule"]


def test_drift_measured_after_the_training_data_was_taken_is_new_to_it(tmp_path: Path) -> None:
    """A training queued for a worker starts long after its snapshot: drift a scoring run
    measured in between was not in its data, so it still fires (it did not, by the run's
    start); drift measured before the snapshot was answered."""
    settings = load_settings(
        env={"VALUELOOP_PII_SALT": "s", "VALUELOOP_RETRAIN_DRIFT_PSI": "0.25"}, home=tmp_path
    )
    settings.ensure_dirs()
    now = datetime.now(UTC)
    naive = now.replace(tzinfo=None)
    with duckdb.connect(str(settings.warehouse_path)) as con:
        con.execute("create schema marts")
        con.execute("create schema monitoring")
        con.execute(
            "create table marts.customer_scores_history as select 'run-1' as scoring_run_id,"
            " '1' as model_version"
        )
        con.execute(
            "create table monitoring.feature_drift as select 'run-1' as scoring_run_id,"
            " ?::timestamp as computed_at, 'recency_days' as feature, 0.4::double as psi",
            [naive - timedelta(hours=3)],  # between the snapshot and the run's start
        )
        con.execute(
            "create table monitoring.score_drift (scoring_run_id varchar,"
            " previous_run_id varchar, score varchar, psi double)"
        )
    client = MlflowClient(settings.mlflow_tracking_uri)
    experiment = client.create_experiment(TrainConfig.load(settings.train_config).experiment)

    def drift_fires_after(started_hours_ago: float, taken_hours_ago: float | None) -> bool:
        run = client.create_run(
            experiment,
            start_time=int((now - timedelta(hours=started_hours_ago)).timestamp() * 1000),
            tags={"valueloop.kind": "training"},
        )
        if taken_hours_ago is not None:
            taken = (now - timedelta(hours=taken_hours_ago)).isoformat()
            client.log_param(run.info.run_id, "data_taken_at", taken)
        client.set_terminated(run.info.run_id, "FINISHED")
        reasons = retraining.decide(settings, now).customer_model
        return any(r.startswith("drift: PSI 0.400 of recency_days") for r in reasons)

    assert not drift_fires_after(2, None)  # a run logged before the time was: its start
    assert drift_fires_after(1, 5)  # taken before the measure, started after it
    assert not drift_fires_after(0.5, 2)  # taken after it: answered


def test_a_training_killed_without_a_word_counts_as_crashed(tmp_path: Path) -> None:
    """A run MLflow still calls running a day after it started was killed (out of memory, a
    lost worker): the corrections it would have trained on are still new."""
    settings = load_settings(
        env={"VALUELOOP_PII_SALT": "s", "VALUELOOP_RETRAIN_MIN_CORRECTIONS": "1"},
        home=tmp_path,
    )
    settings.ensure_dirs()
    with duckdb.connect(str(settings.warehouse_path)) as con:
        ensure_raw_schema(con)
        con.execute(
            "insert into raw.label_feedback (feedback_id, customer_id, label, corrected_value,"
            " valid_from, source, submitted_at, _source_file, _row_number, _loaded_at,"
            " _batch_id) values ('f1', 'C1', 'is_churned', 'false', date '2025-01-01', 'team',"
            " now(), 'f', 1, now(), 'b')"
        )
    client = MlflowClient(settings.mlflow_tracking_uri)
    cfg = TrainConfig.load(settings.train_config)
    experiment = client.create_experiment(cfg.experiment)
    now = datetime.now(UTC)

    def training(hours_ago: float, status: str | None) -> None:
        run = client.create_run(
            experiment,
            start_time=int((now - timedelta(hours=hours_ago)).timestamp() * 1000),
            tags={"valueloop.kind": "training"},
        )
        client.log_param(run.info.run_id, "label_corrections", 1)
        if status:
            client.set_terminated(run.info.run_id, status)

    # Loaded into raw, not yet built into the labels: no training could have seen it, and a
    # training data snapshot taken now does not count it as seen.
    assert retraining.decide(settings, now).facts["label_corrections"] == 0
    assert label_corrections(settings.warehouse_path) == 0
    with duckdb.connect(str(settings.warehouse_path)) as con:  # what the dbt build makes
        con.execute("create schema marts")
        con.execute("create table marts.label_corrections as select * from raw.label_feedback")
    assert label_corrections(settings.warehouse_path) == 1
    training(30, None)  # killed: never terminated
    fired = retraining.decide(settings, now)
    assert fired.facts["corrections_trained_on"] == 0
    assert fired.customer_model[-1] == "1 new label corrections (threshold 1)"
    training(2, None)  # running now: it will have trained on the correction
    assert retraining.decide(settings, now).facts["corrections_trained_on"] == 1
