"""The Great Expectations file context in ``expectations/``: suites and checkpoints as code.

Each suite validates one row of metrics that DuckDB computed (one column per check), so GX
never loads a table. Suites, validation definitions and checkpoints are (re)written from code
on every run; their bounds are fixed, so the files stay the same. Validation results and Data
Docs go to ``expectations/gx/uncommitted/``, which git ignores.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import great_expectations as gx
import pandas as pd
from great_expectations.checkpoint import UpdateDataDocsAction
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.exceptions import DataContextError

from valueloop.quality.checks import Check

DATASOURCE = "valueloop_metrics"


@contextmanager
def exclusive(project_dir: Path) -> Iterator[None]:
    """Holds the file context for one process at a time. Every home on a machine validates
    through the one folder: a run with other plausibility settings rewrites a suite there, and
    every run adds its results to the store that Data Docs are rebuilt from; without the lock
    two processes at once could validate against the other's suite or read a half-written
    result."""
    lock = project_dir / "gx" / "uncommitted" / "valueloop.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def get_context(project_dir: Path):
    return gx.get_context(mode="file", project_root_dir=str(project_dir))


def _batch_definition(context, suite_name: str):
    try:
        datasource = context.data_sources.get(DATASOURCE)
    except KeyError:
        datasource = context.data_sources.add_pandas(name=DATASOURCE)
    try:
        asset = datasource.get_asset(suite_name)
    except LookupError:
        asset = datasource.add_dataframe_asset(name=suite_name)
    try:
        return asset.get_batch_definition("latest_metrics")
    except KeyError:
        return asset.add_batch_definition_whole_dataframe("latest_metrics")


def _without_ids(suite) -> list[dict]:
    configs = [e.configuration.to_json_dict() for e in suite.expectations]
    return [{k: v for k, v in c.items() if k != "id"} for c in configs]


def build_checkpoint(context, suite_name: str, checks: list[Check]):
    """Suite (one expectation per check), validation definition and checkpoint, as code.

    Objects that already match the code are reused, so the committed files stay the same.
    """
    wanted = gx.ExpectationSuite(
        name=suite_name,
        expectations=[
            gx.expectations.ExpectColumnValuesToBeBetween(
                column=check.name,
                min_value=check.min_value,
                max_value=check.max_value,
                severity=check.severity,
                description=f"{check.table}: {check.description}",
                meta={"check": check.name, "table": check.table, "data_column": check.column},
            )
            for check in checks
        ],
    )
    try:
        suite = context.suites.get(suite_name)
        if _without_ids(suite) != _without_ids(wanted):
            suite = context.suites.add_or_update(wanted)
    except DataContextError:
        suite = context.suites.add(wanted)
    batch_definition = _batch_definition(context, suite_name)
    try:
        definition = context.validation_definitions.get(suite_name)
        if definition.suite.id != suite.id or definition.data.id != batch_definition.id:
            raise DataContextError(f"validation definition {suite_name} is out of date")
    except DataContextError:
        definition = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=suite_name, data=batch_definition, suite=suite)
        )
    name = f"{suite_name}_checkpoint"
    try:
        checkpoint = context.checkpoints.get(name)
        if [d.name for d in checkpoint.validation_definitions] != [definition.name]:
            raise DataContextError(f"checkpoint {name} is out of date")
    except DataContextError:
        checkpoint = context.checkpoints.add_or_update(
            gx.Checkpoint(
                name=name,
                validation_definitions=[definition],
                actions=[UpdateDataDocsAction(name="update_data_docs")],
                result_format={"result_format": "SUMMARY"},
            )
        )
    return checkpoint


def run_checkpoint(
    context,
    suite_name: str,
    checks: list[Check],
    metrics: dict[str, float | None],
    run_id: str,
    run_time: datetime,
) -> tuple[dict[str, bool], Path | None]:
    """Validate the metrics row: each check's success as GX judged it, and its Data Docs page."""
    checkpoint = build_checkpoint(context, suite_name, checks)
    frame = pd.DataFrame([{c.name: metrics[c.name] for c in checks}], dtype="float64")
    result = checkpoint.run(
        batch_parameters={"dataframe": frame},
        run_id=RunIdentifier(run_name=run_id, run_time=run_time),
    )
    outcomes: dict[str, bool] = {}
    pages = [_file_url(context, identifier) for identifier in result.run_results]
    for validation in result.run_results.values():
        for expectation in validation.results:
            if expectation.exception_info and expectation.exception_info.get("raised_exception"):
                raise RuntimeError(
                    f"GX could not evaluate {expectation.expectation_config.meta['check']}: "
                    f"{expectation.exception_info.get('exception_message')}"
                )
            outcomes[expectation.expectation_config.meta["check"]] = bool(expectation.success)
    missing = {c.name for c in checks} - outcomes.keys()
    if missing:
        raise RuntimeError(f"GX returned no result for {', '.join(sorted(missing))}")
    return outcomes, next((p for p in pages if p), None)


def _file_url(context, identifier=None) -> Path | None:
    """The local Data Docs page of a validation result (or the index without one).

    A validation's page renders offline; the index's tables load their scripts from a CDN.
    """
    for site in context.get_docs_sites_urls(resource_identifier=identifier):
        url = site.get("site_url") or ""
        if url.startswith("file://"):
            return Path(url.removeprefix("file://"))
    return None
