"""Batch-level checks whose metrics DuckDB computes, so any table size validates in bounded memory.

A :class:`Check` is a scalar metric over a table (a SQL aggregate) plus the bounds it must stay
in. Great Expectations validates the metrics (one row, one column per check); DuckDB fetches a
few offending rows for every failure, so a message can show what went wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import duckdb

Severity = Literal["critical", "warning"]


@dataclass(frozen=True)
class Check:
    name: str  # unique in its suite: the metric's column and the expectation's id
    table: str
    metric_sql: str  # a scalar aggregate over `table` (rows filtered by `where`)
    description: str
    min_value: float | None = None
    max_value: float | None = None
    severity: Severity = "critical"
    column: str | None = None
    where: str = "true"
    # Offending rows, to sample when the check fails: a predicate over `table`.
    bad_rows: str | None = None
    samples: tuple[str, ...] = field(default=())  # samples known without a query (schema)

    def __post_init__(self) -> None:
        if self.min_value is None and self.max_value is None:
            raise ValueError(f"check {self.name} needs a lower or an upper bound")


@dataclass(frozen=True)
class CheckResult:
    check: Check
    observed: float | None
    success: bool
    samples: tuple[str, ...]

    def describe(self) -> str:
        bounds = " and ".join(
            part
            for part in (
                f">= {self.check.min_value:g}" if self.check.min_value is not None else "",
                f"<= {self.check.max_value:g}" if self.check.max_value is not None else "",
            )
            if part
        )
        where = self.check.table + (f".{self.check.column}" if self.check.column else "")
        observed = (
            "n/a (no batch or no baseline)" if self.observed is None else f"{self.observed:g}"
        )
        text = (
            f"[{self.check.severity}] {self.check.name} on {where}: observed {observed}, "
            f"expected {bounds} ({self.check.description})"
        )
        if self.samples:
            text += "; sample bad values: " + ", ".join(self.samples)
        return text


def compute_metrics(con: duckdb.DuckDBPyConnection, checks: list[Check]) -> dict[str, float | None]:
    """One DuckDB query per (table, filter): every metric of the suite, nothing loaded."""
    groups: dict[tuple[str, str], list[Check]] = {}
    for check in checks:
        groups.setdefault((check.table, check.where), []).append(check)
    metrics: dict[str, float | None] = {}
    for (table, where), group in groups.items():
        selects = ", ".join(f'({c.metric_sql})::double as "{c.name}"' for c in group)
        # count(*) makes it an aggregate query: exactly one row, even over an empty table.
        row = con.execute(f"select count(*), {selects} from {table} where {where}").fetchone()
        metrics.update({c.name: value for c, value in zip(group, row[1:], strict=True)})
    return metrics


def sample_bad_values(
    con: duckdb.DuckDBPyConnection, check: Check, limit: int = 5
) -> tuple[str, ...]:
    if check.samples:
        return check.samples
    if not check.bad_rows:
        return ()
    shown = check.column or "*"
    rows = con.execute(
        f"select {shown} from {check.table} where ({check.where}) and ({check.bad_rows}) "
        f"limit {limit}"
    ).fetchall()
    return tuple(str(row[0]) if len(row) == 1 else str(row) for row in rows)


def table_columns(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    schema, name = table.split(".")
    return [
        r[0]
        for r in con.execute(
            "select column_name from information_schema.columns"
            " where table_schema = ? and table_name = ? order by ordinal_position",
            [schema, name],
        ).fetchall()
    ]


def table_exists(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    return bool(table_columns(con, table))


def schema_check(
    con: duckdb.DuckDBPyConnection, table: str, expected: list[str], name: str
) -> Check:
    """Columns the consumers rely on must all be there (extra columns are fine)."""
    missing = [c for c in expected if c not in set(table_columns(con, table))]
    return Check(
        name=name,
        table=table,
        metric_sql=str(len(missing)),
        description="expected columns are present",
        max_value=0,
        samples=tuple(missing),
    )


def sql_literal(value: object) -> str:
    if value is None:
        return "null"
    return "'" + str(value).replace("'", "''") + "'"
