"""The production topology of docker-compose.yml, run natively on one machine without Docker.

A real Postgres server (Debian's ``postgresql``: Airflow's metadata and MLflow's backend store,
separate databases), a real Redis (Debian's ``redis-server``, the Celery broker), Airflow 3's
API server, scheduler, DAG processor and triggerer on the CeleryExecutor with N Celery workers,
and an MLflow tracking server on Postgres with served artifacts. ``make run-distributed``
(``valueloop stack run``) starts it with the DAGs' time schedules off, runs the pipeline
through the REST API and stops it; ``valueloop stack up`` keeps it running, schedules on,
until Ctrl-C.

Everything lives under ``$VALUELOOP_HOME/stack`` (each service's log in ``stack/logs``),
except Postgres's data folder when running as root: Postgres refuses root, so it runs as the
``postgres`` user with its data in ``/var/tmp``, where that user can reach it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from valueloop import orchestration
from valueloop.config import Settings

log = logging.getLogger(__name__)

DAG_CHAIN = ("ingest_and_transform", "train_model", "score_customers")
# The task whose success makes a run of the DAG count: a scoring run skipped for want of a
# champion (on a first deployment) succeeds without scoring anything.
DONE_WHEN = {"train_model": "train", "score_customers": "publish"}


class StackError(RuntimeError):
    """A service did not come up, or a DAG run failed: names which, with its log tail."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def _postgres_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found[-1]:
        raise StackError(f"{name} not found: `make run-distributed` installs Debian's postgresql")
    return found[-1]


def _as_postgres_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass
class Stack:
    """One machine, the compose file's services as processes; ``start`` then ``stop``."""

    settings: Settings
    workers: int = 2
    # Off for a one-shot run: only the triggered run and the runs its assets trigger (on
    # start, catchup-off schedules would otherwise run the latest daily and weekly intervals).
    schedules: bool = True
    ports: dict[str, int] = field(default_factory=dict)
    _processes: list[tuple[str, subprocess.Popen, IO]] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.settings.stack_dir

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def postgres_data(self) -> Path:
        if os.geteuid() != 0:
            return self.root / "postgres"
        digest = hashlib.sha256(str(self.settings.home).encode()).hexdigest()[:12]
        return Path("/var/tmp") / f"valueloop-postgres-{digest}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    def stack_settings(self) -> Settings:
        """The platform's settings with the stack's Airflow home and MLflow server."""
        return replace(
            self.settings,
            airflow_home=self.root / "airflow",
            mlflow_tracking_uri=self.mlflow_url,
            schedules=self.schedules,
        )

    def airflow_overrides(self) -> dict[str, str]:
        pg = f"postgres@127.0.0.1:{self.ports['postgres']}"
        secret_file = self.root / "jwt_secret"
        if not secret_file.exists():
            secret_file.write_text(secrets.token_urlsafe(32))
        return {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{pg}/airflow",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://{pg}/airflow",
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{self.ports['redis']}/0",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
            # Warm workers: dbt, GX and the models imported once, before each task's fork.
            "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": "valueloop.celery_config.CELERY_CONFIG",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secret_file.read_text(),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        }

    # --- processes ----------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        out = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._processes.append((name, process, out))
        log.info("started %s (pid %s): %s", name, process.pid, " ".join(command))

    def _wait_until(self, name: str, ready, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        process = next(p for n, p, _ in self._processes if n == name)
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                state = "exited" if process.poll() is not None else "did not become ready"
                raise StackError(
                    f"{name} {state}; {self.logs / (name + '.log')}:\n"
                    f"{_tail(self.logs / (name + '.log'))}"
                )
            time.sleep(1)

    @staticmethod
    def _http_ok(url: str) -> bool:
        import httpx

        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def _refuse_if_postgres_runs(self, doing: str) -> None:
        """Raise when a Postgres server (this stack's or another process's) runs on the data."""
        pid_file = self.postgres_data / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return  # no server
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return  # a stale pid file, left by a crash
        except PermissionError:
            pass  # alive, under another user
        raise RuntimeError(
            f"a Postgres server (pid {pid}) runs on {self.postgres_data}: stop the stack that "
            f"uses it (`valueloop stack` for home {self.settings.home}) before {doing}"
        )

    def discard_postgres_data(self) -> None:
        """Remove Postgres's data (stopped first): the Airflow metadata and MLflow registry."""
        self._refuse_if_postgres_runs("discarding its data")
        if self.postgres_data.exists():
            shutil.rmtree(self.postgres_data)

    def _claim_postgres_data(self) -> None:
        """Postgres's data outside the home (as root, in /var/tmp) belongs to this home only
        while both hold the same token. A home deleted and made again at the same path (``make
        clean``, a test's temporary folder) would otherwise inherit a registry whose artifacts
        and a warehouse whose runs are gone: that data is discarded and Postgres starts afresh."""
        data, token_file = self.postgres_data, self.root / "postgres-token"
        if data.is_relative_to(self.root):
            return  # inside the home: it goes with it
        claimed, mark = data / "valueloop-home-token", None
        token = token_file.read_text() if token_file.exists() else None
        if (data / "PG_VERSION").exists():
            mark = claimed.read_text() if claimed.exists() else None
            # Made before tokens: kept when the home still has the stack's artifacts.
            legacy = mark is None and token is None and (self.root / "mlartifacts").exists()
            if not legacy and (token is None or mark != token):
                self._refuse_if_postgres_runs("starting afresh for a new home at that path")
                log.warning(
                    "Postgres data %s belonged to an earlier home at %s: starting afresh",
                    data,
                    self.settings.home,
                )
                shutil.rmtree(data)
        if token is None:
            token = secrets.token_hex(16)
            token_file.write_text(token)
        if (data / "PG_VERSION").exists() and mark != token:  # a legacy pair, adopted
            claimed.write_text(token)

    def _start_postgres(self) -> None:
        data = self.postgres_data
        self._claim_postgres_data()
        if not (data / "PG_VERSION").exists():
            data.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(data, "postgres", "postgres")
            subprocess.run(
                _as_postgres_user(
                    [_postgres_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
                ),
                check=True,
                capture_output=True,
            )
            if not data.is_relative_to(self.root):
                (data / "valueloop-home-token").write_text(
                    (self.root / "postgres-token").read_text()
                )
        command = [_postgres_bin("postgres"), "-D", str(data), "-p", str(self.ports["postgres"])]
        command += ["-h", "127.0.0.1", "-k", str(data)]
        self._spawn("postgres", _as_postgres_user(command))

        def accepting() -> bool:
            import psycopg2

            try:
                psycopg2.connect(
                    host="127.0.0.1", port=self.ports["postgres"], user="postgres"
                ).close()
            except psycopg2.OperationalError:
                return False
            return True

        self._wait_until("postgres", accepting, timeout=60)
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=self.ports["postgres"], user="postgres")
        con.autocommit = True
        with con.cursor() as cur:
            for database in ("airflow", "mlflow"):
                cur.execute("select 1 from pg_database where datname = %s", (database,))
                if cur.fetchone() is None:
                    cur.execute(f"create database {database}")
        con.close()

    def _start_redis(self) -> None:
        redis = shutil.which("redis-server")
        if not redis:
            raise StackError("redis-server not found: `make run-distributed` installs it")
        command = [redis, "--port", str(self.ports["redis"]), "--bind", "127.0.0.1"]
        self._spawn("redis", [*command, "--save", "", "--appendonly", "no"])

        def pong() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.ports["redis"]), 2) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        self._wait_until("redis", pong, timeout=30)

    def start(self) -> Stack:
        for name in ("postgres", "redis", "api", "mlflow"):
            self.ports.setdefault(name, _free_port())
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._start_postgres()
            self._start_redis()
            settings, overrides = self.stack_settings(), self.airflow_overrides()
            env = orchestration.airflow_env(settings, overrides)
            orchestration.bootstrap(settings, overrides)
            artifacts = self.root / "mlartifacts"
            self._spawn(
                "mlflow",
                [
                    *(str(Path(orchestration.airflow_cli()).with_name("mlflow")), "server"),
                    *("--host", "127.0.0.1", "--port", str(self.ports["mlflow"])),
                    # Two Celery workers and a person in the UI: two server processes do (the
                    # default four cost a minute of CPU at start-up on a laptop's cores).
                    *("--workers", "2"),
                    "--backend-store-uri",
                    f"postgresql+psycopg2://postgres@127.0.0.1:{self.ports['postgres']}/mlflow",
                    *("--serve-artifacts", "--artifacts-destination", str(artifacts)),
                ],
                env,
            )
            airflow = orchestration.airflow_cli()
            self._spawn(
                "api-server",
                [airflow, "api-server", "--host", "127.0.0.1", "--port", str(self.ports["api"])],
                env,
            )
            for component in ("scheduler", "dag-processor", "triggerer"):
                self._spawn(component, [airflow, component], env)
            for n in range(1, self.workers + 1):
                command = [airflow, "celery", "worker", "--celery-hostname", f"worker{n}@%h"]
                self._spawn(f"worker{n}", [*command, "--skip-serve-logs"], env)
            self._wait_until("api-server", lambda: self._http_ok(f"{self.api_url}/api/v2/version"))
            self._wait_until("mlflow", lambda: self._http_ok(f"{self.mlflow_url}/health"))
        except BaseException:
            self.stop()
            raise
        return self

    def running(self) -> list[str]:
        """The services whose process is alive."""
        return [name for name, process, _ in self._processes if process.poll() is None]

    def stop(self) -> None:
        """Stop every service, newest first: workers finish, Postgres shuts down fast."""
        for name, process, out in reversed(self._processes):
            if process.poll() is None:
                sig = signal.SIGINT if name == "postgres" else signal.SIGTERM
                os.killpg(process.pid, sig)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=30)
            out.close()
            log.info("stopped %s (exit %s)", name, process.returncode)
        self._processes.clear()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the REST API -------------------------------------------------------------------

    def _client(self):
        import httpx

        password = orchestration.admin_password(self.stack_settings())
        token = httpx.post(
            f"{self.api_url}/auth/token",
            json={"username": orchestration.ADMIN_USER, "password": password},
            timeout=30,
        )
        token.raise_for_status()
        return httpx.Client(
            base_url=f"{self.api_url}/api/v2",
            headers={"Authorization": f"Bearer {token.json()['access_token']}"},
            timeout=30,
        )

    def trigger(self, dag_id: str) -> str:
        """A new run of ``dag_id`` through the REST API; returns its run id."""
        with self._client() as api:
            reply = api.post(
                f"/dags/{dag_id}/dagRuns", json={"logical_date": datetime.now(UTC).isoformat()}
            )
            reply.raise_for_status()
            return reply.json()["dag_run_id"]

    def runs(self, dag_id: str) -> list[dict]:
        with self._client() as api:
            reply = api.get(f"/dags/{dag_id}/dagRuns", params={"order_by": "run_after"})
            reply.raise_for_status()
            return reply.json()["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        with self._client() as api:
            reply = api.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
            reply.raise_for_status()
            return reply.json()["task_instances"]

    def wait_for_success(self, dag_id: str, since: datetime, timeout: float = 1500.0) -> dict:
        """The first successful run of ``dag_id`` queued after ``since`` that did its work
        (``DONE_WHEN``: a scoring run skipped before the first champion exists does not count);
        the timeout says which runs there were and how they ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fresh = [
                r for r in self.runs(dag_id) if datetime.fromisoformat(r["run_after"]) >= since
            ]
            for run in fresh:
                if run["state"] == "success" and self._did_its_work(dag_id, run):
                    return run
            time.sleep(5)
        states = {r["dag_run_id"]: r["state"] for r in self.runs(dag_id)}
        raise StackError(
            f"{dag_id}: no successful run within {timeout:.0f} s (runs: {states}); "
            f"logs in {self.logs} and {self.stack_settings().airflow_home / 'logs'}"
        )

    def _did_its_work(self, dag_id: str, run: dict) -> bool:
        task_id = DONE_WHEN.get(dag_id)
        if task_id is None:
            return True
        states = {t["task_id"]: t["state"] for t in self.task_instances(dag_id, run["dag_run_id"])}
        return states.get(task_id) == "success"

    def worker_task_counts(self) -> dict[str, int]:
        """Tasks each Celery worker received, from its own log."""
        marker = "execute_workload"
        return {
            f"worker{n}": (self.logs / f"worker{n}.log")
            .read_text(errors="replace")
            .count(f"{marker}[")
            for n in range(1, self.workers + 1)
        }

    def run_pipeline(self) -> dict[str, dict]:
        """Trigger ingest_and_transform; the assets trigger training and scoring. Returns the
        successful run of each DAG."""
        since = datetime.now(UTC)
        self.trigger(DAG_CHAIN[0])
        return {dag_id: self.wait_for_success(dag_id, since) for dag_id in DAG_CHAIN}


def describe(stack: Stack) -> str:
    password = orchestration.admin_password(stack.stack_settings())
    return "\n".join(
        [
            f"Airflow UI and API: {stack.api_url}  (login {orchestration.ADMIN_USER} / {password})",
            f"MLflow:             {stack.mlflow_url}",
            f"Postgres:           127.0.0.1:{stack.ports['postgres']} (databases airflow, mlflow)",
            f"Redis:              127.0.0.1:{stack.ports['redis']}",
            f"workers:            {stack.workers} Celery workers; service logs in {stack.logs}",
        ]
    )


def summary_json(runs: dict[str, dict], stack: Stack) -> str:
    return json.dumps(
        {
            "runs": {d: r["dag_run_id"] for d, r in runs.items()},
            "tasks_per_worker": stack.worker_task_counts(),
        },
        indent=2,
    )
