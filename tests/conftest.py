from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from valueloop.config import Settings, load_settings
from valueloop.simulator import SimulationConfig, generate

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"
ONLINE_RETAIL_CSV = SHARED_DATASETS / "online_retail" / "online_retail.csv.gz"


COMMITTED_SUITES = REPO_ROOT / "expectations" / "gx" / "expectations"
_SAVED_SUITES = pytest.StashKey[dict[Path, bytes]]()
PIPELINE_GROUP = "pipeline_run"
# The files whose tests read the session's pipeline run: one work unit, so it is built once.
PIPELINE_FILES = frozenset(
    f"tests/{path.name}"
    for path in Path(__file__).parent.glob("test_*.py")
    if re.search(r"\bpipeline_run\b", path.read_text())
)
# Then the longest (`pytest --durations`: the stack test about 7 minutes, the CLI runs 4).
LONGEST_FIRST = ("tests/test_stack.py", "tests/test_cli.py")


def work_unit(nodeid: str) -> str:
    """Which tests share a worker under pytest-xdist (``make test`` runs the suite on every
    core): every file that reads the session's pipeline run goes to one worker, so the run is
    built once; every other file's tests stay together, so its module fixtures are built once."""
    path = nodeid.split("::", 1)[0]
    return PIPELINE_GROUP if path in PIPELINE_FILES else path


def pytest_configure(config: pytest.Config) -> None:
    """The GX suites are code-built into the committed ``expectations/`` folder (the project's
    GX context); tests that run with other plausibility settings rebuild them there. The
    controlling process (the only one without ``-n``) keeps the committed files before any
    test runs and puts them back after the last (:func:`pytest_unconfigure`), so a test run
    leaves the working tree as it found it, however many workers ran it."""
    if not hasattr(config, "workerinput"):
        config.stash[_SAVED_SUITES] = {
            path: path.read_bytes() for path in COMMITTED_SUITES.glob("*.json")
        }


def pytest_unconfigure(config: pytest.Config) -> None:
    saved = config.stash.get(_SAVED_SUITES, None)
    if saved is None:
        return
    for path in COMMITTED_SUITES.glob("*.json"):
        if path not in saved:
            path.unlink()
    for path, content in saved.items():
        path.write_bytes(content)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The pipeline's work unit first, then the longest files, then the files in their order:
    xdist hands the units out in this order, and none of the long ones is left for last."""
    rank = {unit: i for i, unit in enumerate((PIPELINE_GROUP, *LONGEST_FIRST))}
    items.sort(key=lambda item: rank.get(work_unit(item.nodeid), len(rank)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's scope scheduling over :func:`work_unit`. (Its ``--dist loadgroup`` marks do not
    reach the scheduler under pytest 9, whose node ids it can no longer suffix.)"""
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return WorkUnits(config, log)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings with every path under a fresh home folder."""
    return load_settings(env={}, home=tmp_path / "home")


@pytest.fixture(scope="session")
def demo_shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo shop, generated once per test session."""
    out = tmp_path_factory.mktemp("demo_shop")
    generate(out, SimulationConfig(customers=3_000, seed=7))
    return out


def write_text(path: Path, text: str, encoding: str = "utf-8", bom: bool = False) -> Path:
    data = text.encode(encoding)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


def list_runs(settings: Settings, dag_id: str) -> list[dict]:
    """`airflow dags list-runs -o json` (Airflow logs to stdout before the JSON)."""
    from valueloop import orchestration

    listed = subprocess.run(
        [orchestration.airflow_cli(), "dags", "list-runs", dag_id, "-o", "json"],
        env=orchestration.airflow_env(settings),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(listed.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(command: list[str], env: dict[str, str], ready_url: str) -> Iterator[None]:
    """A server in its own process group, up once ``ready_url`` answers 200; always stopped."""
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(ready_url, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    output = log.read().decode(errors="replace")[-3000:]
                    pytest.fail(f"{command[0]} did not come up at {ready_url}:\n{output}")
                time.sleep(1)
            yield
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)


@contextmanager
def airflow_api_server(settings: Settings) -> Iterator[str]:
    """Airflow's API server (REST API and UI) on the platform's metadata DB; yields its URL."""
    from valueloop import orchestration

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [orchestration.airflow_cli(), "api-server", "--port", str(port)]
    with serving(
        [*command, "--host", "127.0.0.1"],
        orchestration.airflow_env(settings),
        f"{base}/api/v2/monitor/health",
    ):
        yield base


def run_valueloop(
    *args: str, home: Path, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The `valueloop` command in its own process, on ``home``, with none of this process's
    VALUELOOP_/AIRFLOW settings leaking in (the PII salt of the test homes: "s"), and
    ``env`` on top."""
    settings = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VALUELOOP_", "AIRFLOW"))}
    env.update({"VALUELOOP_HOME": str(home), "VALUELOOP_PII_SALT": "s", **settings})
    return subprocess.run(
        [str(Path(sys.executable).with_name("valueloop")), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """`valueloop run` through Airflow on a tiny shop with a tiny model, once per session (the
    tests that read it share one xdist worker: :func:`work_unit`).

    Its terminal output is kept beside the home as ``run-output.txt``.
    """
    home = tmp_path_factory.mktemp("pipeline")
    result = run_valueloop(
        "run",
        "--customers",
        "800",
        "--train-config",
        str(REPO_ROOT / "ml" / "configs" / "tiny.yaml"),
        home=home,
        timeout=1500,
    )
    assert result.returncode == 0, (result.stdout[-6000:], result.stderr[-6000:])
    (home / "run-output.txt").write_text(result.stdout)
    return load_settings(
        env={
            "VALUELOOP_PII_SALT": "s",
            "VALUELOOP_TRAIN_CONFIG": str(REPO_ROOT / "ml" / "configs" / "tiny.yaml"),
        },
        home=home,
    )


# A BI tool in its own process that keeps its connection open: reads, waits, reads again.
_BI_READER = """
import sys, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
read = "select scoring_run_id, count(*) from marts.customer_scores group by 1"
print(con.execute(read).fetchall(), flush=True)
sys.stdin.readline()
print(con.execute(read).fetchall(), flush=True)
"""


@contextmanager
def bi_connection_held_open(database: Path) -> Iterator[list[str]]:
    """Holds ``database`` open read-only in another process for the body of the ``with``;
    yields a list that then holds what it read before and what it read after."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _BI_READER, str(database)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    reads = [holder.stdout.readline()]
    try:
        yield reads
        holder.stdin.write("again\n")
        holder.stdin.flush()
        reads.append(holder.stdout.readline())
    finally:
        holder.communicate(timeout=60)
    assert holder.returncode == 0, f"the BI reader failed on {database}"
