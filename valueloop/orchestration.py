"""Airflow around the pipeline: task defaults, the warehouse pool, and the launchers.

Nothing here imports Airflow at module level: DAG files import the defaults cheaply, and the
launchers run Airflow's own CLI in subprocesses with an environment built from the config.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from valueloop import progress, quietly
from valueloop.config import REPO_ROOT, Settings

if TYPE_CHECKING:
    from valueloop.terminal import StageBoard

log = logging.getLogger(__name__)

WAREHOUSE_POOL = "valueloop_warehouse"  # one slot: DuckDB has one writer at a time
DAG_IDS = ("ingest_and_transform", "train_model", "score_customers")  # `valueloop run`'s order
# Every DAG of the project: the loop's feedback DAG runs on its own schedule.
ALL_DAG_IDS = (*DAG_IDS, "ingest_feedback")
ADMIN_USER = "admin"


def log_failure_summary(context) -> None:
    """on_failure_callback: one line a data engineer can act on, then Airflow's own log."""
    progress.record_task_event(context, "failed")
    ti = context["ti"]
    log.error(
        "valueloop task failed: dag=%s task=%s run=%s try=%s error=%r; logs: %s",
        ti.dag_id,
        ti.task_id,
        context.get("run_id"),
        ti.try_number,
        context.get("exception"),
        getattr(ti, "log_url", "see the task log"),
    )


DEFAULT_ARGS = {
    "owner": "valueloop",
    "retries": 2,
    "retry_delay": timedelta(seconds=20),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "on_failure_callback": log_failure_summary,
    # What `valueloop run` follows to draw its stage lines (no-ops under a scheduler).
    "on_execute_callback": partial(progress.record_task_event, event="started"),
    "on_success_callback": partial(progress.record_task_event, event="success"),
    "on_retry_callback": partial(progress.record_task_event, event="retry"),
}


def airflow_env(settings: Settings, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Airflow's environment: SQLite metadata by default; ``overrides`` swap in another
    stack (valueloop/stack.py: Postgres, Redis and the CeleryExecutor)."""
    home = settings.airflow_home
    return {
        **os.environ,
        **settings.as_env(),
        "VALUELOOP_PII_SALT": settings.resolve_pii_salt(),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__COSMOS__ENABLE_TELEMETRY": "False",
        # Cosmos keeps dbt's partial-parse file between tasks; one cache per home (its default,
        # /tmp/cosmos, is shared by every home on the machine).
        "AIRFLOW__COSMOS__CACHE_DIR": str(home / "cosmos"),
        "DO_NOT_TRACK": "True",
        "PYTHONUNBUFFERED": "1",
        **(overrides or {}),
    }


def airflow_cli() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def _airflow(
    settings: Settings, *args: str, quiet: bool = True, overrides: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [airflow_cli(), *args],
        env=airflow_env(settings, overrides),
        text=True,
        capture_output=quiet,
        check=False,
    )
    if result.returncode != 0:
        output = ((result.stdout or "") + (result.stderr or ""))[-4000:] if quiet else ""
        raise RuntimeError(
            f"`airflow {' '.join(args)}` failed (exit {result.returncode})"
            + (f":\n{output}" if output else "")
        )
    return result


def admin_password(settings: Settings) -> str:
    """The UI login, made once per Airflow home (simple auth manager's password file)."""
    path = settings.airflow_home / "passwords.json"
    if not path.exists():
        settings.airflow_home.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({ADMIN_USER: secrets.token_urlsafe(12)}))
        path.chmod(0o600)
    return json.loads(path.read_text())[ADMIN_USER]


def bootstrap(settings: Settings, overrides: dict[str, str] | None = None) -> None:
    """Metadata DB (SQLite unless ``overrides`` say otherwise), the one-slot warehouse pool,
    the dbt manifest cosmos renders."""
    from valueloop import transform

    settings.ensure_dirs()
    admin_password(settings)
    airflow = partial(_airflow, settings, overrides=overrides)
    airflow("db", "migrate")
    airflow(
        "pools",
        "set",
        WAREHOUSE_POOL,
        "1",
        "DuckDB allows one writer: every task that writes the warehouse takes this slot",
    )
    transform.run_dbt(settings, ["parse"], quiet=True)
    airflow("dags", "reserialize")  # the UI and the API list DAGs from the DB


# `airflow dags test` marks where each task's log starts and ends in its output.
_TASK_STARTS = re.compile(r"\[DAG TEST\] starting task_id=(\S+) map_index=")
_TASK_ENDS = re.compile(r"\[DAG TEST\] end task task_id=(\S+) ")


def file_task_logs(settings: Settings, dag_log: Path, events: list[dict]) -> list[Path]:
    """Write each task's part of a `dags test` output where the Airflow UI reads task logs.

    ``dags test`` runs tasks in process and prints their logs instead of filing them, so the
    UI would show every task's log empty. Airflow's own markers delimit each task's lines;
    the task callbacks' events give each start its run id and try number. The paths follow
    Airflow's default ``log_filename_template`` under the Airflow home's ``logs`` folder.
    """
    starts = [e for e in events if e["event"] == "started"]
    written: list[Path] = []
    target, lines = None, []
    for line in dag_log.read_text(errors="replace").splitlines(keepends=True):
        if target is None and (started := _TASK_STARTS.search(line)):
            event = next((e for e in starts if e["task_id"] == started.group(1)), None)
            if event is not None:
                starts.remove(event)
                target = (
                    settings.airflow_home
                    / "logs"
                    / f"dag_id={event['dag_id']}"
                    / f"run_id={event['run_id']}"
                    / f"task_id={event['task_id']}"
                    / f"attempt={event['try']}.log"
                )
        if target is not None:
            lines.append(line)
            if _TASK_ENDS.search(line):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text("".join(lines))
                written.append(target)
                target, lines = None, []
    return written


class DagRunFailed(RuntimeError):
    """A DAG run that did not succeed; the message names the task and shows its log's tail."""


def follow_dag_test(
    settings: Settings,
    dag_id: str,
    board: StageBoard,
    log_path: Path,
    logical_date: str | None = None,
    verbose: bool = False,
    conf: dict | None = None,
) -> str:
    """`airflow dags test` for one DAG, drawing a line per stage; returns the logical date.

    The logical date defaults to now, so the run's start, end and duration in the UI are the
    true ones (``dags test`` records a run's start as its logical date). Airflow's output goes
    to ``log_path`` (to the terminal with ``verbose``).
    """
    logical_date = logical_date or datetime.now(UTC).replace(microsecond=0).isoformat()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    events_path = log_path.with_suffix(".events.jsonl")
    events_path.unlink(missing_ok=True)
    reader = progress.EventReader(events_path)
    env = {**airflow_env(settings), progress.PROGRESS_FILE_ENV: str(events_path)}
    current: str | None = None
    seen: list[dict] = []
    done_tasks: dict[str, int] = {}
    failure: str | None = None
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [airflow_cli(), "dags", "test", dag_id, logical_date]
            + (["--conf", json.dumps(conf)] if conf else []),
            env=env,
            stdout=None if verbose else log,
            stderr=None if verbose else subprocess.STDOUT,
        )
        while True:
            finished = process.poll() is not None
            for event in reader.new_events():
                seen.append(event)
                stage = progress.stage_of(event["dag_id"], event["task_id"])
                if event["event"] == "started" and stage != current:
                    if current:
                        board.finish(current)
                    board.start(stage)
                    current = stage
                elif event["event"] == "success" and progress.is_task_group(
                    event["dag_id"], event["task_id"]
                ):
                    done_tasks[stage] = done_tasks.get(stage, 0) + 1
                    board.update(stage, f"{done_tasks[stage]} tasks done")
                elif event["event"] == "retry":
                    board.update(stage, f"{event['task_id']} failed (try {event['try']}), retrying")
                elif event["event"] == "failed":
                    failure = event["task_id"]
            if finished:
                break
            time.sleep(0.25)
    if not verbose:
        file_task_logs(settings, log_path, seen)
    if process.returncode == 0 and failure is None:
        if current:
            board.finish(current)
        return logical_date
    if current:
        board.finish(current, f"task {failure or '?'} failed", ok=False)
    tail = "" if verbose else "\n" + quietly.tail(log_path)
    raise DagRunFailed(
        f"DAG {dag_id} (logical date {logical_date}) failed"
        + (f" in task {failure}" if failure else "")
        + f"; full log: {log_path}{tail}"
    )


def run_dags(
    settings: Settings,
    board: StageBoard,
    logs_dir: Path,
    logical_date: str | None = None,
    dag_ids: tuple[str, ...] = DAG_IDS,
    verbose: bool = False,
) -> dict[str, str]:
    """Each DAG through `airflow dags test`, in order; stops at the first failed run.

    `dags test` runs `train_model` as a manual run, which the retrain asset did not trigger:
    it is given the reasons that the retraining triggers give now (as `decide_retraining`
    decided at the end of `ingest_and_transform`), so its runs record why they trained; with
    none, it retrains both models as any manual run does.

    Returns each DAG's logical date (now at its start, unless one is given).
    """
    dates = {}
    for dag_id in dag_ids:
        conf = None
        if dag_id == "train_model":
            from valueloop import retraining

            decision = retraining.decide(settings)
            if decision.any:
                conf = {
                    "customer_model": decision.customer_model,
                    "uplift_model": decision.uplift_model,
                }
        dates[dag_id] = follow_dag_test(
            settings, dag_id, board, logs_dir / f"{dag_id}.log", logical_date, verbose, conf
        )
    return dates


def standalone(settings: Settings) -> int:
    """`airflow standalone` with the project's DAGs; blocks until interrupted."""
    bootstrap(settings)
    print(
        f"Airflow UI: http://localhost:8080  login: {ADMIN_USER} / {admin_password(settings)}"
        f"\n(Airflow home {settings.airflow_home}; Ctrl-C stops it)",
        flush=True,
    )
    return subprocess.run(
        [airflow_cli(), "standalone"], env=airflow_env(settings), check=False
    ).returncode
