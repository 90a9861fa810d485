"""Airflow around the pipeline: task defaults, the warehouse pool, and the launchers.

Nothing here imports Airflow at module level: DAG files import the defaults cheaply, and the
launchers run Airflow's own CLI in subprocesses with an environment built from the config.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from valueloop.config import REPO_ROOT, Settings

log = logging.getLogger(__name__)

WAREHOUSE_POOL = "valueloop_warehouse"  # one slot: DuckDB has one writer at a time
DAG_IDS = ("ingest_and_transform", "train_model", "score_customers")
ADMIN_USER = "admin"


def log_failure_summary(context) -> None:
    """on_failure_callback: one line a data engineer can act on, then Airflow's own log."""
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
}


def airflow_env(settings: Settings) -> dict[str, str]:
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
        "DO_NOT_TRACK": "True",
        "PYTHONUNBUFFERED": "1",
    }


def airflow_cli() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def _airflow(settings: Settings, *args: str, quiet: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [airflow_cli(), *args],
        env=airflow_env(settings),
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


def bootstrap(settings: Settings) -> None:
    """Metadata DB (SQLite), the one-slot warehouse pool, the dbt manifest cosmos renders."""
    from valueloop import transform

    settings.ensure_dirs()
    admin_password(settings)
    _airflow(settings, "db", "migrate")
    _airflow(
        settings,
        "pools",
        "set",
        WAREHOUSE_POOL,
        "1",
        "DuckDB allows one writer: every task that writes the warehouse takes this slot",
    )
    transform.run_dbt(settings, ["parse"], quiet=True)
    _airflow(settings, "dags", "reserialize")  # the UI and the API list DAGs from the DB


def dag_run_state(settings: Settings, dag_id: str, logical_date: str) -> str:
    result = _airflow(settings, "dags", "state", dag_id, logical_date)
    return result.stdout.strip().splitlines()[-1].split(",")[0].strip()


def run_dags(settings: Settings, logical_date: str, dag_ids: tuple[str, ...] = DAG_IDS) -> None:
    """`airflow dags test` for each DAG in order; stops at the first failed run."""
    for dag_id in dag_ids:
        print(f"\n=== airflow dags test {dag_id} {logical_date}", flush=True)
        subprocess.run(
            [airflow_cli(), "dags", "test", dag_id, logical_date],
            env=airflow_env(settings),
            check=False,
        )
        state = dag_run_state(settings, dag_id, logical_date)
        if state != "success":
            raise RuntimeError(
                f"DAG {dag_id} run for {logical_date} ended {state!r}; see the "
                f"task logs under {settings.airflow_home / 'logs'}"
            )
        print(f"=== {dag_id}: {state}", flush=True)


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
