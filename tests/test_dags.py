"""The Airflow DAGs: DagBag integrity, a real end-to-end run, and the REST API."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import UTC, datetime

import duckdb
import httpx
import mlflow
import pytest
from rich.console import Console

from ml.config import TrainConfig
from tests.conftest import REPO_ROOT, airflow_api_server, list_runs
from valueloop import orchestration, transform
from valueloop.config import Settings, load_settings
from valueloop.orchestration import DAG_IDS
from valueloop.terminal import StageBoard

DAGBAG_PROBE = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
heavy = [m for m in ("pandas", "torch", "duckdb", "mlflow", "sklearn", "lightgbm",
                     "transformers", "great_expectations") if m in sys.modules]
dags = {}
for dag_id, dag in bag.dags.items():
    dags[dag_id] = {
        "tags": sorted(dag.tags), "file": dag.fileloc,
        "tasks": {t.task_id: {"owner": t.owner, "retries": t.retries, "pool": t.pool,
                              "outlets": [getattr(o, "name", None) for o in t.outlets],
                              "callback": bool(t.on_failure_callback),
                              "env": getattr(t, "env", None),
                              "upstream": sorted(t.upstream_task_ids),
                              "trigger_rule": str(getattr(t.trigger_rule, "value",
                                                          t.trigger_rule))}
                  for t in dag.tasks},
        "schedule": type(dag.timetable).__name__
        + repr(getattr(dag.timetable, "asset_condition", "")),
    }
stats = {s.file: s.duration.total_seconds() if hasattr(s.duration, "total_seconds")
         else float(s.duration) for s in bag.dagbag_stats}
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()},
                  "dags": dags, "stats": stats, "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def airflow_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = load_settings(
        env={"VALUELOOP_PII_SALT": "s"}, home=tmp_path_factory.mktemp("airflow_home")
    )
    settings.ensure_dirs()
    transform.run_dbt(settings, ["parse"], quiet=True)  # the manifest cosmos renders
    return settings


def dagbag(settings: Settings, env: dict[str, str] | None = None) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", DAGBAG_PROBE, str(REPO_ROOT / "dags")],
        env=env or orchestration.airflow_env(settings),
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_dagbag_imports_cleanly_with_house_rules(airflow_settings: Settings) -> None:
    bag = dagbag(airflow_settings)
    assert bag["errors"] == {}
    assert set(bag["dags"]) == set(orchestration.ALL_DAG_IDS)
    assert bag["heavy"] == [], "DAG files must not import heavy libraries at parse time"
    for file, seconds in bag["stats"].items():
        assert seconds < 2.0, f"{file} took {seconds:.2f}s to parse"
    for dag_id, dag in bag["dags"].items():
        assert "valueloop" in dag["tags"], dag_id
        for task_id, task in dag["tasks"].items():
            assert task["owner"] == "valueloop", (dag_id, task_id)
            assert task["retries"] >= 1, (dag_id, task_id)
            assert task["callback"], (dag_id, task_id)


def test_every_warehouse_writer_takes_the_one_slot_pool(airflow_settings: Settings) -> None:
    dags = dagbag(airflow_settings)["dags"]
    ingest = dags["ingest_and_transform"]["tasks"]
    # Deciding and requesting retraining write nothing (the decision only reads), nor does
    # the check for something new (it reads what ingest returned).
    readers = ("land", "anything_new", "retraining_needed", "request_retraining")
    writers = [t for t in ingest if t not in readers]
    assert writers and all(ingest[t]["pool"] == orchestration.WAREHOUSE_POOL for t in writers)
    assert any(t.startswith("dbt.") for t in ingest), "each dbt model is an Airflow task"
    scoring = dags["score_customers"]["tasks"]
    # champion_ready only asks the MLflow registry; every other scoring task writes.
    assert scoring["champion_ready"]["pool"] != orchestration.WAREHOUSE_POOL
    assert all(
        task["pool"] == orchestration.WAREHOUSE_POOL
        for task_id, task in scoring.items()
        if task_id != "champion_ready"
    )
    # Training copies the marts out under the pool, then trains without holding it.
    training = dags["train_model"]["tasks"]
    assert training["snapshot_training_data"]["pool"] == orchestration.WAREHOUSE_POOL
    assert training["train"]["pool"] != orchestration.WAREHOUSE_POOL


def test_dbt_tasks_find_the_warehouse_from_valueloop_home_alone(airflow_settings: Settings) -> None:
    # docker-compose sets VALUELOOP_HOME, not the warehouse path the dbt profile reads: the
    # dbt tasks carry the path the platform resolves from it, and no secret.
    env = orchestration.airflow_env(airflow_settings)
    del env["VALUELOOP_WAREHOUSE_PATH"]
    tasks = dagbag(airflow_settings, env)["dags"]["ingest_and_transform"]["tasks"]
    dbt_tasks = [task for task_id, task in tasks.items() if task_id.startswith("dbt.")]
    assert dbt_tasks
    for task in dbt_tasks:
        assert task["env"]["VALUELOOP_WAREHOUSE_PATH"] == str(airflow_settings.warehouse_path)
        assert "VALUELOOP_PII_SALT" not in task["env"]


def test_assets_wire_the_dags_together(airflow_settings: Settings) -> None:
    dags = dagbag(airflow_settings)["dags"]
    build = dags["ingest_and_transform"]["tasks"]
    assert build["check_marts"]["outlets"] == ["valueloop_marts"]
    # Raw and feedback assets say something new was checked or built, not that a run looked.
    assert build["ingest"]["outlets"] == [] and build["check_raw"]["outlets"] == ["valueloop_raw"]
    assert build["check_raw"]["upstream"] == ["anything_new"]
    # A build skipped for nothing new still decides on retraining; one that failed does not.
    assert build["decide_retraining"]["trigger_rule"] == "none_failed"
    feedback = dags["ingest_feedback"]["tasks"]
    assert feedback["ingest"]["outlets"] == []
    assert feedback["dbt_feedback"]["outlets"] == ["valueloop_feedback"]
    for announce in ("announce_customer_champion", "announce_uplift_champion"):
        assert dags["train_model"]["tasks"][announce]["outlets"] == ["valueloop_champion"]
    assert dags["score_customers"]["tasks"]["publish"]["outlets"] == ["valueloop_scores"]
    assert "AssetOrTimeSchedule" in dags["train_model"]["schedule"]
    assert "valueloop_retrain_request" in dags["train_model"]["schedule"]
    for dag_id in ("ingest_and_transform", "ingest_feedback"):
        outlets = dags[dag_id]["tasks"]["request_retraining"]["outlets"]
        assert outlets == ["valueloop_retrain_request"], dag_id
    schedule = dags["score_customers"]["schedule"]
    assert "valueloop_marts" in schedule and "valueloop_champion" in schedule


def test_scoring_before_any_champion_is_skipped_not_failed(tmp_path) -> None:
    """A first deployment: the marts asset triggers scoring before training has promoted a
    model. The run skips (champion_ready) and succeeds; nothing is scored or published."""
    settings = load_settings(env={"VALUELOOP_PII_SALT": "s"}, home=tmp_path / "home")
    orchestration.bootstrap(settings)
    with StageBoard(Console(file=io.StringIO())) as board:
        orchestration.run_dags(settings, board, tmp_path / "logs", None, ("score_customers",))
    (run,) = list_runs(settings, "score_customers")
    assert run["state"] == "success"
    log = (tmp_path / "logs" / "score_customers.log").read_text()
    assert "has no champion yet" in log
    assert not settings.warehouse_path.exists()  # the scorer never opened it


def test_the_dags_run_end_to_end_and_publish_scores(pipeline_run: Settings) -> None:
    settings = pipeline_run
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        scored, to_score = con.execute("""select (select count(*) from marts.customer_scores),
                                          (select count(*) from marts.scoring_set)""").fetchall()[0]
        runs = con.execute("select distinct scoring_run_id from marts.customer_scores").fetchall()
    assert scored == to_score > 0
    assert runs[0][0].startswith("manual__")  # the Airflow run id
    for dag_id in orchestration.DAG_IDS:
        states = {r["state"] for r in list_runs(settings, dag_id)}
        assert states == {"success"}, (dag_id, states)
    # `dags test` runs train_model as a manual run: it trained for the reason the retraining
    # triggers gave, which MLflow records, not as "manual run".
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(TrainConfig.load(settings.train_config).experiment)
    [first] = client.search_runs(
        [experiment.experiment_id],
        "tags.`valueloop.kind` = 'training'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    assert first.data.tags["valueloop.retrain_reason"] == "no champion yet"


def test_the_run_reads_like_a_cli_and_airflow_keeps_its_true_times(pipeline_run: Settings) -> None:
    settings = pipeline_run
    output = (settings.home / "run-output.txt").read_text()
    stages = [line.split()[1] for line in output.splitlines() if line.startswith("✓")]
    assert stages == [
        *("generate", "airflow", "ingest", "raw", "dbt", "marts", "retrain?", "train"),
        *("score", "scores", "publish", "plan", "loop", "loop"),
    ]
    assert "Summary" in output and "champion:" in output and "make airflow" in output
    assert len(output.splitlines()) < 70, output  # two screens at most, the loop's included
    assert "[info" not in output and "Epoch" not in output  # tools' output is in the logs
    (run_logs,) = settings.logs_dir.glob("run-*")
    started = datetime.strptime(run_logs.name, "run-%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    for dag_id in DAG_IDS:
        assert "DagRun Finished" in (run_logs / f"{dag_id}.log").read_text()
        (run,) = [r for r in list_runs(settings, dag_id) if r["state"] == "success"]
        start, end = (datetime.fromisoformat(run[k]) for k in ("start_date", "end_date"))
        assert started <= start <= end <= datetime.now(UTC), (dag_id, run)
    # `dags test` files no task logs itself: the launcher files them where the UI reads them.
    (publish_log,) = (settings.airflow_home / "logs" / "dag_id=score_customers").rglob(
        "task_id=publish/attempt=1.log"
    )
    assert "published marts.customer_scores" in publish_log.read_text()


def test_rerunning_the_same_date_leaves_the_same_tables(pipeline_run: Settings) -> None:
    settings = pipeline_run
    tables = ("raw.order_lines", "raw.quarantine", "marts.fct_order_lines", "marts.scoring_set")

    def counts() -> dict[str, int]:
        with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
            return {t: con.execute(f"select count(*) from {t}").fetchall()[0][0] for t in tables}

    before = counts()
    (run,) = list_runs(settings, "ingest_and_transform")
    with StageBoard(Console(file=io.StringIO())) as board:
        orchestration.run_dags(
            settings, board, settings.logs_dir / "rerun", run["logical_date"], DAG_IDS[:1]
        )
    assert counts() == before
    # The same logical date: the run is replaced, not added.
    assert [r["logical_date"] for r in list_runs(settings, "ingest_and_transform")] == [
        run["logical_date"]
    ]


def test_the_rest_api_lists_and_triggers_dags(pipeline_run: Settings) -> None:
    settings = pipeline_run
    with airflow_api_server(settings) as base:
        token = httpx.post(
            f"{base}/auth/token",
            json={
                "username": orchestration.ADMIN_USER,
                "password": orchestration.admin_password(settings),
            },
            timeout=10,
        )
        assert token.status_code in (200, 201), token.text
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        dags = httpx.get(f"{base}/api/v2/dags", headers=headers, timeout=10).json()
        assert set(orchestration.DAG_IDS) <= {d["dag_id"] for d in dags["dags"]}
        created = httpx.post(
            f"{base}/api/v2/dags/train_model/dagRuns",
            headers=headers,
            json={"logical_date": None},
            timeout=10,
        )
        assert created.status_code == 200, created.text
        run_id = created.json()["dag_run_id"]
        fetched = httpx.get(
            f"{base}/api/v2/dags/train_model/dagRuns/{run_id}", headers=headers, timeout=10
        )
        assert fetched.json()["state"] in ("queued", "running")
