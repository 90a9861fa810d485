"""Run a checkpoint: metrics in DuckDB, judgement by GX, results in the warehouse, Data Docs.

A ``critical`` failure raises :class:`QualityError` (after the results are stored), which
stops the pipeline; a ``warning`` is stored and reported, and the run goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import duckdb

from valueloop.config import Settings
from valueloop.quality import gx_project, suites
from valueloop.quality.checks import Check, CheckResult, compute_metrics, sample_bad_values
from valueloop.warehouse import connect

Checkpoint = Literal["raw", "marts", "scores"]
CHECKPOINTS: tuple[Checkpoint, ...] = ("raw", "marts", "scores")

RESULTS_DDL = """
create schema if not exists quality;
create table if not exists quality.validation_results (
    run_id varchar not null,
    checkpoint varchar not null,
    check_name varchar not null,
    table_name varchar not null,
    column_name varchar,
    severity varchar not null,
    success boolean not null,
    observed_value double,
    min_value double,
    max_value double,
    description varchar not null,
    sample_values varchar,
    validated_at timestamp not null
);
"""


class QualityError(Exception):
    """A critical expectation failed: the message names suite, expectation, column, samples."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        failures = "\n".join(f"  - {r.describe()}" for r in report.critical_failures)
        super().__init__(
            f"{report.checkpoint} checkpoint stopped the pipeline (suite {report.suite}, "
            f"run {report.run_id}): {len(report.critical_failures)} critical expectation(s) "
            f"failed:\n{failures}"
            + (f"\nData Docs: {report.data_docs}" if report.data_docs else "")
            + (
                "\nA batch that should not have been loaded comes out with `valueloop withdraw"
                " <batch> --reason ...` (its rows go to raw.quarantine); then land the"
                " corrected file."
                if any("; batch " in r.check.description for r in report.critical_failures)
                else ""
            )
        )


@dataclass(frozen=True)
class ValidationReport:
    checkpoint: Checkpoint
    run_id: str
    results: list[CheckResult]
    data_docs: Path | None

    @property
    def suite(self) -> str:
        return f"valueloop_{self.checkpoint}"

    @property
    def critical_failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.success and r.check.severity == "critical"]

    @property
    def warnings(self) -> list[CheckResult]:
        return [r for r in self.results if not r.success and r.check.severity == "warning"]

    @property
    def success(self) -> bool:
        return not self.critical_failures

    def summary(self) -> str:
        passed = sum(r.success for r in self.results)
        lines = [
            f"{self.checkpoint} checkpoint: {passed}/{len(self.results)} expectations met, "
            f"{len(self.critical_failures)} critical, {len(self.warnings)} warning(s) "
            f"(run {self.run_id})"
        ]
        lines += [f"  - {r.describe()}" for r in self.critical_failures + self.warnings]
        if self.data_docs:
            lines.append(f"Data Docs: {self.data_docs}")
        return "\n".join(lines)


def default_run_id(now: datetime | None = None) -> str:
    return "manual__" + (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S")


_LAST_PASSED = """
    with runs as (
        select run_id, max(validated_at) as validated_at,
               bool_and(success or severity <> 'critical') as passed
        from quality.validation_results
        where checkpoint = ? and run_id <> ?
        group by run_id
    )
    select run_id, validated_at from runs where passed order by validated_at desc limit 1
"""


def previous_baseline(con: duckdb.DuckDBPyConnection, checkpoint: str, run_id: str) -> dict:
    """Observed values of the latest earlier run of this checkpoint with no critical failure."""
    rows = con.execute(
        f"""
        with latest as ({_LAST_PASSED})
        select check_name, observed_value from quality.validation_results
        where checkpoint = ? and run_id = (select run_id from latest)
            and observed_value is not null
        """,
        [checkpoint, run_id, checkpoint],
    ).fetchall()
    return dict(rows)


def last_passed_at(con: duckdb.DuckDBPyConnection, checkpoint: str, run_id: str):
    """When the latest earlier run of this checkpoint with no critical failure validated."""
    row = con.execute(_LAST_PASSED, [checkpoint, run_id]).fetchone()
    return row[1] if row else None


def _fails(check: Check, observed: float | None) -> bool:
    """Whether the value is outside the check's bounds (GX judges the one it is given)."""
    if observed is None:
        return False
    return (check.min_value is not None and observed < check.min_value) or (
        check.max_value is not None and observed > check.max_value
    )


def _worst_of_the_batches(
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
    run_id: str,
    checked_at: datetime,
    checks: list[Check],
    metrics: dict[str, float | None],
) -> dict[str, Check]:
    """The raw checkpoint over every batch loaded since its last run without a critical
    failure, not only each entity's latest: a check takes the first batch's value that fails
    it, newest first (``metrics`` is updated in place), and the check returned for its name
    reads that batch, so that its samples and its description name it. GX still validates
    one row with the suite's own checks, so the suite stays the same however many batches
    came in."""
    latest = suites.latest_batch_ids(con)

    def in_batch(check: Check, batch_id: str | None) -> Check:
        if batch_id is None or check.name.endswith(".schema"):
            return check
        return replace(check, description=f"{check.description}; batch {batch_id}")

    chosen = {c.name: in_batch(c, latest.get(c.name.split(".")[0])) for c in checks}
    since = last_passed_at(con, "raw", run_id)
    for batch_id, batch_checks in suites.raw_earlier_batches(con, settings, checked_at, since):
        observed = compute_metrics(con, batch_checks)
        for check in batch_checks:
            if _fails(check, observed[check.name]) and not _fails(
                chosen[check.name], metrics[check.name]
            ):
                metrics[check.name] = observed[check.name]
                chosen[check.name] = in_batch(check, batch_id)
    return chosen


def _suite_checks(
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
    checkpoint: Checkpoint,
    checked_at: datetime,
    baseline: dict,
    scores_table: str,
):
    if checkpoint == "raw":
        suites.require_table(con, "raw.ingest_batches", "run `valueloop ingest` first")
        return suites.raw_suite(con, settings, checked_at)
    if checkpoint == "marts":
        suites.require_table(con, "marts.scoring_set", "run `valueloop transform` first")
        return suites.marts_suite(con, settings, checked_at, baseline)
    suites.require_table(con, scores_table, "run `valueloop score` first")
    return suites.scores_suite(con, scores_table, baseline)


def _store(
    con: duckdb.DuckDBPyConnection, report: ValidationReport, validated_at: datetime
) -> None:
    con.execute("begin transaction")
    con.execute(
        "delete from quality.validation_results where run_id = ? and checkpoint = ?",
        [report.run_id, report.checkpoint],
    )
    con.executemany(
        "insert into quality.validation_results values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                report.run_id,
                report.checkpoint,
                r.check.name,
                r.check.table,
                r.check.column,
                r.check.severity,
                r.success,
                r.observed,
                r.check.min_value,
                r.check.max_value,
                r.check.description,
                "; ".join(r.samples) or None,
                validated_at,
            )
            for r in report.results
        ],
    )
    con.execute("commit")


def run_checkpoint(
    settings: Settings,
    checkpoint: Checkpoint,
    run_id: str | None = None,
    checked_at: datetime | None = None,
    scores_table: str = suites.SCORES_TABLE,
    raise_on_critical: bool = True,
) -> ValidationReport:
    """Validate one boundary; store the results; raise QualityError on a critical failure."""
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {checkpoint!r}; choose one of {CHECKPOINTS}")
    checked_at = checked_at or datetime.now(UTC).replace(tzinfo=None)
    run_id = run_id or default_run_id(checked_at)
    with connect(settings.warehouse_path) as con:
        con.execute(RESULTS_DDL)
        baseline = previous_baseline(con, checkpoint, run_id)
        checks = _suite_checks(con, settings, checkpoint, checked_at, baseline, scores_table)
        metrics = compute_metrics(con, checks)
        judged = {c.name: c for c in checks}
        if checkpoint == "raw":
            judged = _worst_of_the_batches(con, settings, run_id, checked_at, checks, metrics)
        with gx_project.exclusive(settings.gx_project_dir):
            context = gx_project.get_context(settings.gx_project_dir)
            outcomes, docs_page = gx_project.run_checkpoint(
                context, f"valueloop_{checkpoint}", checks, metrics, run_id, checked_at
            )
        results = [
            CheckResult(
                judged[check.name],
                metrics[check.name],
                outcomes[check.name],
                () if outcomes[check.name] else sample_bad_values(con, judged[check.name]),
            )
            for check in checks
        ]
        report = ValidationReport(checkpoint, run_id, results, docs_page)
        _store(con, report, checked_at)
    if raise_on_critical and not report.success:
        raise QualityError(report)
    return report
