"""Transform: run the dbt project against the warehouse and report what failed, clearly."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from valueloop.config import Settings
from valueloop.contract import FEEDBACK_ENTITIES
from valueloop.ingest import ensure_raw_schema
from valueloop.quality.checks import table_exists
from valueloop.warehouse import connect

FAILED_STATUSES = {"error", "fail", "runtime error"}
SCORING_TAG, BI_VIEWS_TAG = "scoring", "bi_views"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class TransformError(Exception):
    """dbt failed; the message lists each failing model or test with dbt's reason."""


@dataclass(frozen=True)
class NodeResult:
    unique_id: str
    status: str
    message: str
    failures: int | None


@dataclass(frozen=True)
class TransformResult:
    command: list[str]
    nodes: list[NodeResult]

    @property
    def failed(self) -> list[NodeResult]:
        return [n for n in self.nodes if n.status in FAILED_STATUSES]

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.status] = counts.get(node.status, 0) + 1
        return "dbt: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))


def dbt_executable(settings: Settings) -> str:
    found = (
        str(settings.dbt_executable) if settings.dbt_executable.exists() else shutil.which("dbt")
    )
    if not found:
        raise TransformError("dbt is not installed in this environment; run `make install`")
    return found


def dbt_vars(as_of: list[date] | None = None, horizon_days: int | None = None) -> dict:
    values: dict[str, object] = {}
    if as_of:
        values["as_of_dates"] = sorted({d.isoformat() for d in as_of})
    if horizon_days is not None:
        values["horizon_days"] = horizon_days
    return values


def run_dbt(
    settings: Settings, args: list[str], variables: dict | None = None, quiet: bool = False
) -> TransformResult:
    """Run one dbt command with the platform's profile, target folder, vars and secrets."""
    settings.dbt_target_dir.mkdir(parents=True, exist_ok=True)
    command = [
        dbt_executable(settings),
        *args,
        "--project-dir",
        str(settings.dbt_project_dir),
        "--profiles-dir",
        str(settings.dbt_project_dir),
        "--target-path",
        str(settings.dbt_target_dir),
    ]
    if variables:
        command += ["--vars", json.dumps(variables)]
    env = {
        **os.environ,
        **settings.as_env(),
        "VALUELOOP_PII_SALT": settings.resolve_pii_salt(),
        "DBT_LOG_PATH": str(settings.dbt_target_dir.parent / "logs"),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
    }
    # A dbt that fails before it writes its results (a parse error) must not be reported
    # with the results of the run before it.
    (settings.dbt_target_dir / "run_results.json").unlink(missing_ok=True)
    completed = subprocess.run(
        command,
        env=env,
        cwd=settings.dbt_project_dir,
        text=True,
        check=False,
        capture_output=quiet,
    )
    result = TransformResult(command, _read_run_results(settings.dbt_target_dir))
    if completed.returncode != 0:
        details = "\n".join(
            f"  - {n.unique_id}: {n.status}"
            + (f" ({n.failures} failing rows)" if n.failures else "")
            + f": {n.message}"
            for n in result.failed
        )
        output = (completed.stdout or "")[-3000:] if quiet else ""
        raise TransformError(
            f"dbt {args[0]} failed (exit {completed.returncode})"
            + (f":\n{details}" if details else f"; see the output above{output}")
            + f"\nrun results: {settings.dbt_target_dir / 'run_results.json'}"
        )
    return result


def _read_run_results(target_dir: Path) -> list[NodeResult]:
    path = target_dir / "run_results.json"
    if not path.exists():
        return []
    payload = json.loads(path.read_text())
    return [
        NodeResult(
            r["unique_id"],
            r["status"],
            ANSI_ESCAPE.sub("", r.get("message") or "").strip(),
            r.get("failures"),
        )
        for r in payload.get("results", [])
    ]


def build(
    settings: Settings,
    as_of: list[date] | None = None,
    horizon_days: int | None = None,
    select: str | None = None,
    quiet: bool = False,
) -> TransformResult:
    """`dbt build`: seeds, models and their tests, unit tests included."""
    if not settings.warehouse_path.exists():
        raise TransformError(
            f"{settings.warehouse_path}: no warehouse yet; run `valueloop ingest` first"
        )
    # Scoring candidates and BI views read tables that `valueloop score` writes.
    args = ["build"] + (
        ["--select", select]
        if select
        else ["--exclude", f"tag:{SCORING_TAG}", f"tag:{BI_VIEWS_TAG}"]
    )
    return run_dbt(settings, args, dbt_vars(as_of, horizon_days), quiet=quiet)


def docs(settings: Settings, quiet: bool = False) -> Path:
    """`dbt docs generate`; returns the folder holding index.html."""
    run_dbt(settings, ["docs", "generate"], quiet=quiet)
    return settings.dbt_target_dir


FEEDBACK_SELECTION = "stg_feedback__campaign_outcomes+ stg_feedback__label_feedback+"


# raw.ingest_batches' feedback batches
FEEDBACK_BATCHES = "entity in (" + ", ".join(f"'{e.name}'" for e in FEEDBACK_ENTITIES) + ")"


def _feedback_loaded_through(con) -> object:
    """When the latest feedback batch was loaded (None: none yet)."""
    return con.execute(
        f"select max(loaded_at) from raw.ingest_batches where {FEEDBACK_BATCHES}"
    ).fetchone()[0]


def _unbuilt(settings: Settings, batches: str, builds: str) -> int:
    """Batches of ``raw.ingest_batches`` matching ``batches`` loaded after the latest
    ``loaded_through`` recorded in the build table ``builds`` (every one of them before its
    first build; none before anything was ingested, and no warehouse made for asking)."""
    if not settings.warehouse_path.exists():
        return 0  # nothing ingested yet
    with connect(settings.warehouse_path) as con:
        if not table_exists(con, "raw.ingest_batches"):
            return 0
        built = (
            f"(select max(loaded_through) from {builds})"
            if table_exists(con, builds)
            else "null::timestamp"
        )
        return con.execute(
            f"select count(*) from raw.ingest_batches where {batches} and loaded_at >"
            f" coalesce({built}, '-infinity'::timestamp)"
        ).fetchone()[0]


def feedback_unbuilt(settings: Settings) -> int:
    """Feedback batches loaded since the feedback marts were last built by
    :func:`build_feedback` (every one of them, before its first build). A build that failed
    leaves them counted, so the next feedback run builds them even when no file is new."""
    return _unbuilt(settings, FEEDBACK_BATCHES, "raw.feedback_builds")


# raw.ingest_batches' batches of the shop's own data (the marts' input but for the feedback)
SHOP_BATCHES = f"not ({FEEDBACK_BATCHES})"


def shop_loaded_through(settings: Settings) -> str | None:
    """When the latest batch of shop data was loaded (ISO time; None: none yet)."""
    if not settings.warehouse_path.exists():
        return None
    with connect(settings.warehouse_path) as con:
        if not table_exists(con, "raw.ingest_batches"):
            return None
        at = con.execute(
            f"select max(loaded_at) from raw.ingest_batches where {SHOP_BATCHES}"
        ).fetchone()[0]
    return None if at is None else at.isoformat()


def marts_unbuilt(settings: Settings) -> int:
    """Shop batches loaded since the scheduled DAG last built and checked the marts
    (:func:`record_marts_build`; every one of them before its first build). A build that
    failed leaves them counted, so the next scheduled run builds them though no file is new."""
    return _unbuilt(settings, SHOP_BATCHES, "raw.marts_builds")


def record_marts_build(settings: Settings, loaded_through: str | None) -> None:
    """The marts were built and checked from the shop batches loaded through
    ``loaded_through`` (what :func:`shop_loaded_through` said before the build)."""
    with connect(settings.warehouse_path) as con:
        ensure_raw_schema(con)
        con.execute(
            "insert into raw.marts_builds values (current_localtimestamp(), ?::timestamp)",
            [loaded_through],
        )


def build_feedback(settings: Settings, quiet: bool = True) -> TransformResult:
    """`dbt build` of what the feedback changes: campaign results and performance, the
    corrected labels and the training set (scoring candidates and BI views excepted).
    A build that succeeds records in ``raw.feedback_builds`` the feedback it built."""
    with connect(settings.warehouse_path) as con:
        through = _feedback_loaded_through(con)
    args = ["build", "--select", FEEDBACK_SELECTION]
    args += ["--exclude", f"tag:{SCORING_TAG}", f"tag:{BI_VIEWS_TAG}"]
    result = run_dbt(settings, args, quiet=quiet)
    with connect(settings.warehouse_path) as con:
        ensure_raw_schema(con)
        con.execute(
            "insert into raw.feedback_builds values (current_localtimestamp(), ?)", [through]
        )
    return result
