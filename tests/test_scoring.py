"""Batch scoring through the real registry, DuckDB, dbt and GX, on a tiny champion."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import duckdb
import mlflow
import numpy as np
import pandas as pd
import pytest

from ml import registry
from ml.config import DEFAULT_CONFIG, TrainConfig
from ml.report import reason_drivers
from ml.score import score
from ml.train import train
from tests.conftest import bi_connection_held_open
from valueloop import bi_snapshot, cli, jobs, transform
from valueloop.config import Settings, load_settings
from valueloop.quality.runner import QualityError
from valueloop.quality.suites import SCORES_COLUMNS
from valueloop.simulator import SimulationConfig, generate

TINY = Path(DEFAULT_CONFIG).with_name("tiny.yaml")
NAME = TrainConfig().registered_model


class OutOfRangePyfunc(mlflow.pyfunc.PythonModel):
    """A broken model: its churn 'probabilities' exceed 1."""

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        n = len(model_input)
        rng = np.random.default_rng(0)
        out = pd.DataFrame(
            {
                "p_high": 0.2,
                "p_active": 0.3,
                "p_lapsed": 0.5,
                "churn_probability": 1.5,
                "value_tier": "lapsed",
            },
            index=model_input.index,
        )
        for i in range(4):
            out[f"embedding_{i}"] = rng.normal(size=n)
        return out


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, object]:
    settings = load_settings(
        env={"VALUELOOP_PII_SALT": "s"}, home=tmp_path_factory.mktemp("scoring")
    )
    generate(settings.demo_dir, SimulationConfig(customers=1_200, seed=17))
    jobs.ingest_path(settings, settings.demo_dir, "simulator")
    transform.build(settings, quiet=True)
    train(
        TrainConfig.load(TINY),
        settings.warehouse_path,
        settings.mlflow_tracking_uri,
        settings.mlflow_artifacts_dir,
        settings.home / "cache",
    )
    return settings, score(settings, "run-1", TrainConfig.load(TINY), batch_rows=500)


def query(settings: Settings, sql: str, params: list | None = None) -> list[tuple]:
    """A BI user's connection: separate and read-only."""
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def test_every_customer_is_scored_segmented_and_published(scored) -> None:
    settings, report = scored
    [(scored_rows, to_score)] = query(
        settings,
        """
        select (select count(*) from marts.customer_scores),
               (select count(*) from marts.scoring_set)""",
    )
    assert scored_rows == to_score == report.customers > 0
    columns = [r[0] for r in query(settings, "describe marts.customer_scores")]
    assert set(SCORES_COLUMNS) <= set(columns)
    [(bad,)] = query(
        settings,
        """
        select count(*) from marts.customer_scores where abs(p_high + p_active + p_lapsed - 1)
        > 1e-5 or churn_probability not between 0 and 1 or next_best_action is null""",
    )
    assert bad == 0
    segments = query(settings, "select segment_name, n_customers from marts.segment_summary")
    assert len(segments) == report.segments >= 3
    assert sum(n for _, n in segments) == scored_rows
    [(versions,)] = query(
        settings, "select count(distinct model_version) from marts.customer_scores"
    )
    assert versions == 1
    # Reason codes come with every champion but the document transformer, for every customer:
    # TreeSHAP for LightGBM and the ensemble and stack built on it, integrated gradients for
    # the sequence transformer.
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    champion = client.get_model_version_by_alias(NAME, registry.CHAMPION)
    tags = client.get_run(champion.run_id).data.tags
    kind = tags["valueloop.model"]
    document = kind == "transformer" and tags.get("encoder") != "sequence"
    [(explained, tiered, sample)] = query(
        settings,
        "select count(churn_reasons), count(tier_reasons), min(churn_reasons)"
        " from marts.customer_scores",
    )
    if document:
        assert explained == 0
    else:
        assert explained == tiered == scored_rows
        assert 1 <= sample.count(" risk)") <= 3


def test_bi_reads_the_published_tables_read_only(scored) -> None:
    settings, _ = scored
    mix = dict(
        query(settings, "select value_tier, count(*) from marts.bi_customer_scores group by 1")
    )
    assert set(mix) <= {"high", "active", "lapsed"} and sum(mix.values()) > 0
    plan = query(
        settings, "select next_best_action, sum(n_customers) from marts.bi_action_plan group by 1"
    )
    assert plan
    with (
        duckdb.connect(str(settings.warehouse_path), read_only=True) as con,
        pytest.raises(duckdb.Error, match="read-only"),
    ):
        con.execute("delete from marts.customer_scores")


def test_bi_snapshot_report_and_mlflow_run(scored) -> None:
    settings, report = scored
    assert bi_snapshot.current(settings.exports_dir) == report.snapshot_dir
    with duckdb.connect(str(report.snapshot_dir / "bi.duckdb"), read_only=True) as bi:
        for table in bi_snapshot.BI_TABLES:
            count = f"select count(*) from {table}"
            assert bi.execute(count).fetchone() == tuple(query(settings, count)[0]), table
    page = report.report_path.read_text()
    assert "Tier mix" in page and "Segments" in page and "data:image/png;base64" in page
    # the reason codes, summarised: the drivers named most often among high-risk customers
    assert "Why: reason codes" in page and "(raises risk)" in page
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("valueloop-scoring")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.scoring_run_id = 'run-1'"
    )
    assert runs and "silhouette" in runs[0].data.metrics
    assert "calinski_harabasz" in runs[0].data.metrics


def test_rerunning_a_run_replaces_and_a_new_run_appends(scored) -> None:
    settings, first = scored
    before = query(settings, "select count(*) from marts.customer_scores_history")[0][0]
    score(settings, "run-1", TrainConfig.load(TINY), batch_rows=500)
    assert query(settings, "select count(*) from marts.customer_scores_history")[0][0] == before
    second = score(settings, "run-2", TrainConfig.load(TINY), batch_rows=500)
    runs = dict(
        query(
            settings,
            "select scoring_run_id, count(*) from marts.customer_scores_history group by 1",
        )
    )
    assert runs == {"run-1": first.customers, "run-2": second.customers}
    assert "Compared with run" in second.report_path.read_text()
    # Rerun after a later run: it keeps its time, so it stays before run-2 and is not
    # compared with it (monitoring's previous run is the one scored before it: none).
    stamp = "select distinct scored_at from marts.customer_scores_history where scoring_run_id = ?"
    at = query(settings, stamp, ["run-1"])
    rerun = score(settings, "run-1", TrainConfig.load(TINY), batch_rows=500)
    assert query(settings, stamp, ["run-1"]) == at
    assert "run-2" not in rerun.report_path.read_text()
    assert at[0][0] < query(settings, stamp, ["run-2"])[0][0]
    assert not query(
        settings,
        "select 1 from monitoring.score_drift where scoring_run_id = 'run-1'"
        " and previous_run_id = 'run-2'",
    )


def test_a_failing_run_leaves_the_published_scores_untouched(scored) -> None:
    settings, _ = scored
    snapshot = "select * from marts.customer_scores order by customer_id"
    published = query(settings, snapshot)
    history = query(settings, "select count(*) from marts.customer_scores_history")
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    good = registry.champion_version(client, NAME)
    registry.configure(settings.mlflow_tracking_uri, settings.mlflow_artifacts_dir, "broken")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model", python_model=OutOfRangePyfunc(), registered_model_name=NAME
        )
    registry.set_alias(NAME, registry.CHAMPION, str(info.registered_model_version))
    try:
        with pytest.raises(QualityError, match=r"customer_scores\.probability_out_of_range"):
            score(settings, "run-broken", TrainConfig.load(TINY), batch_rows=500)
    finally:
        registry.set_alias(NAME, registry.CHAMPION, good)
    assert query(settings, snapshot) == published
    assert query(settings, "select count(*) from marts.customer_scores_history") == history
    assert not query(
        settings, "select 1 from marts.customer_scores_history where scoring_run_id = 'run-broken'"
    )


def test_a_bi_connection_held_open_never_blocks_a_publish(scored, monkeypatch, capsys) -> None:
    settings, _ = scored
    exports = settings.exports_dir
    opened = bi_snapshot.current(exports)
    with bi_connection_held_open(bi_snapshot.current_database(exports)) as reads:
        report = score(settings, "run-held", TrainConfig.load(TINY), batch_rows=500)
    assert reads[0] == reads[1]  # its snapshot, whole, all along
    assert bi_snapshot.current(exports) == report.snapshot_dir != opened
    with duckdb.connect(str(bi_snapshot.current_database(exports)), read_only=True) as bi:
        runs = bi.execute("select distinct scoring_run_id from marts.customer_scores").fetchall()
    assert runs == [("run-held",)]
    assert opened.exists()  # kept: within the retention (24 h by default)
    monkeypatch.setenv("VALUELOOP_HOME", str(settings.home))
    assert cli.main(["bi-rollback"]) == 0
    assert bi_snapshot.current(exports) == opened
    assert str(opened) in capsys.readouterr().out
    assert bi_snapshot.rollback(exports) == report.snapshot_dir  # and forward again
    # Past the retention, only the current snapshot and the previous one stay.
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        newest = bi_snapshot.publish_snapshot(con, exports, "prune", timedelta(0))
    assert sorted((exports / "snapshots").iterdir()) == sorted([report.snapshot_dir, newest])


def test_a_snapshot_current_all_day_stays_readable_for_the_retention_after_it(
    tmp_path: Path,
) -> None:
    """The retention counts from when a snapshot stopped being current, not from when it was
    made: one current for 23 hours, opened minutes before the next publish, is still there
    after two more publishes, and goes once it has been replaced longer than the retention."""
    import os
    import time

    exports = tmp_path / "exports"
    with duckdb.connect() as warehouse:
        warehouse.execute("create schema marts")
        for table in bi_snapshot.BI_TABLES:
            warehouse.execute(f"create table {table} as select 1 as x")
        day = timedelta(hours=24)
        first = bi_snapshot.publish_snapshot(warehouse, exports, "a", day)
        made = time.time() - 23 * 3600
        os.utime(first, (made, made))  # current for 23 hours
        with duckdb.connect(str(bi_snapshot.current_database(exports)), read_only=True) as bi:
            second = bi_snapshot.publish_snapshot(warehouse, exports, "b", day)
            # Two hours pass: the first was made 25 hours ago and replaced 2 hours ago.
            retired = first / bi_snapshot.RETIRED
            retired.write_text(f"{float(retired.read_text()) - 2 * 3600}\n")
            made = time.time() - 25 * 3600
            os.utime(first, (made, made))
            third = bi_snapshot.publish_snapshot(warehouse, exports, "c", day)
            assert first.exists()  # its reader has the retention from its replacement
            assert bi.execute("select count(*) from marts.customer_scores").fetchone() == (1,)
        retired.write_text(f"{time.time() - 25 * 3600}\n")  # replaced 25 hours ago
        fourth = bi_snapshot.publish_snapshot(warehouse, exports, "d", day)
    assert sorted((exports / "snapshots").iterdir()) == sorted([second, third, fourth])


def test_reason_drivers_count_each_driver_once_per_customer_whatever_its_figures() -> None:
    texts = pd.Series(
        [
            "no order in 120 days (raises risk); spent 0 in the last 90 days (raises risk)",
            "no order in 30 days (lowers risk); spent 1,204.5 in the last 90 days (lowers risk)",
            "no order in 200 days (raises risk); 1 order so far (raises risk)",
            "12 orders so far (raises risk)",
            None,
        ]
    )
    drivers = reason_drivers(texts).set_index("driver")
    assert drivers.loc["N orders so far (raises risk)", "customers"] == 2  # one order or twelve
    assert drivers.loc["no order in N days (raises risk)", "customers"] == 2
    assert drivers.loc["spent N in the last N days (lowers risk)", "customers"] == 1
    assert drivers.loc["no order in N days (raises risk)", "share"] == round(2 / 4, 3)
    assert list(drivers["customers"]) == sorted(drivers["customers"], reverse=True)


def test_feature_drift_travels_to_publish_as_strict_json() -> None:
    """The score task returns its stats to Airflow, whose XCom refuses NaN: a feature no
    customer has (a shop without reviews) goes as null and comes back as NaN."""
    import json

    from ml.score import _drift_frame, _drift_records

    drift = pd.DataFrame(
        {
            "feature": ["avg_rating", "frequency"],
            "psi": [np.nan, 0.02],
            "reference_mean": [np.nan, 3.1],
            "current_mean": [np.nan, 3.0],
            "reference": "run r",
            "status": ["n/a", "stable"],
        }
    )
    sent = json.dumps({"feature_drift": _drift_records(drift)}, allow_nan=False)
    back = _drift_frame(json.loads(sent))
    pd.testing.assert_frame_equal(back, drift)
