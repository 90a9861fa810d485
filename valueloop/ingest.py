"""Ingest: load a source file into the typed raw contract, atomically and idempotently.

A *source* (see :mod:`valueloop.loaders`) yields chunks of string columns with each record's
1-based number in its file, plus SQL expressions that map its columns onto an entity of the
raw contract. Typing happens inside DuckDB: every row either lands in the entity's table or in
``raw.quarantine`` with the column and the reason, so rows read = accepted + quarantined. A value
that parses but lies outside its plausible range (:mod:`valueloop.plausibility`) is quarantined
too.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from valueloop.config import Settings
from valueloop.contract import ENTITIES, LABELS, OUTCOME_EVENTS, Entity, all_ddl
from valueloop.plausibility import PlausibleRange, plausible_ranges

log = logging.getLogger(__name__)

DEFAULT_TIMESTAMP_FORMATS = (
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%d %H:%M:%S.%f",
    "%Y-%m-%dT%H:%M:%S.%f",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d",
)
# What a decoder puts where bytes are not valid in the file's encoding.
REPLACEMENT_CHAR = "\ufffd"


class IngestError(Exception):
    """A file that cannot be ingested at all; the message names the file and the cause."""


@dataclass
class SourceChunk:
    """String columns of consecutive records; ``row_numbers`` are 1-based within the file."""

    columns: dict[str, list[str | None]]
    row_numbers: list[int]
    # Records that could not even be split into fields: (row number, reason, raw text).
    malformed: list[tuple[int, str, str]] = field(default_factory=list)


@dataclass
class Source:
    """A file ready to ingest into one entity of the raw contract."""

    path: Path
    entity: Entity
    source_format: str
    # Canonical column -> SQL expression over the source's string columns (quoted names).
    mapping: dict[str, str]
    chunks: Iterator[SourceChunk] | None = None
    # A DuckDB relation SQL producing string columns plus _row_number (Parquet path).
    relation_sql: str | None = None
    timestamp_formats: tuple[str, ...] = DEFAULT_TIMESTAMP_FORMATS
    part: str | None = None  # a sheet of a workbook: each part is a batch of its own
    ignored_columns: tuple[str, ...] = ()  # columns of the file the format does not use

    @property
    def name(self) -> str:
        """What lineage columns record as ``_source_file``."""
        return f"{self.path}#{self.part}" if self.part else str(self.path)


@dataclass(frozen=True)
class IngestResult:
    source_file: str
    entity: str
    batch_id: str
    rows_read: int
    rows_accepted: int
    rows_quarantined: int
    skipped: bool
    ignored_columns: tuple[str, ...] = ()

    def summary(self) -> str:
        if self.skipped:
            return f"{self.source_file} [{self.entity}]: already loaded as batch {self.batch_id}"
        return (
            f"{self.source_file} [{self.entity}]: read {self.rows_read:,}, "
            f"accepted {self.rows_accepted:,}, quarantined {self.rows_quarantined:,} "
            f"(batch {self.batch_id})"
            + (
                f"; ignored extra column(s): {', '.join(self.ignored_columns)}"
                if self.ignored_columns
                else ""
            )
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_raw_schema(con: duckdb.DuckDBPyConnection) -> None:
    for statement in all_ddl():
        con.execute(statement)


def _typed_expression(sql_type: str, text: str, timestamp_formats: tuple[str, ...]) -> str:
    if sql_type == "varchar":
        return text
    if sql_type == "timestamp":
        formats = ", ".join("'" + f.replace("'", "''") + "'" for f in timestamp_formats)
        return f"try_strptime({text}, [{formats}])"
    return f"try_cast({text} as {sql_type})"


def typing_sql(source: Source, input_relation: str, ranges: tuple[PlausibleRange, ...]) -> str:
    """SQL typing ``input_relation`` into the entity's columns plus ``_errors``.

    A row's errors list every value that does not parse, then every parsed value outside its
    plausible range; each error starts with its column's name.
    """
    entity = source.entity
    raw_selects, typed_selects, checks = [], [], []
    for column in entity.columns:
        expression = source.mapping.get(column.name, "null")
        raw_selects.append(f"nullif(trim(({expression})::varchar), '') as \"raw__{column.name}\"")
        raw = f'"raw__{column.name}"'
        typed = _typed_expression(column.sql_type, raw, source.timestamp_formats)
        typed_selects.append(f'{typed} as "{column.name}"')
        checks.append(
            f"case when contains({raw}, '{REPLACEMENT_CHAR}') "
            f"then '{column.name}: invalid bytes for the file encoding' "
            + (
                f"when {raw} is null then '{column.name}: missing required value' "
                if column.required
                else ""
            )
            + f'when {raw} is not null and "{column.name}" is null '
            f"then '{column.name}: cannot parse ' || {raw} || ' as {column.sql_type}' end"
        )
    for plausible in ranges:
        raw = f'"raw__{plausible.column}"'
        checks.append(f"case when {plausible.outside()} then {plausible.reason(raw)} end")
    raw_json = ", ".join(f"'{c.name}', \"raw__{c.name}\"" for c in entity.columns)
    return f"""
        with mapped as (
            select _row_number, {", ".join(raw_selects)} from {input_relation}
        ),
        typed as (
            select *, {", ".join(typed_selects)} from mapped
        )
        select
            _row_number,
            {", ".join(f'"{c.name}"' for c in entity.columns)},
            list_filter([{", ".join(checks)}], lambda x: x is not null) as _errors,
            [{", ".join(f'"raw__{c.name}"' for c in entity.columns)}] as _raw_values,
            json_object({raw_json})::varchar as _raw_record
        from typed
    """


def _lit(values) -> str:
    return ", ".join("'" + v + "'" for v in values)


def _duplicate(key: str, table: str) -> str:
    """Predicate over ``_typed``: the row repeats an earlier clean row of the batch, or a loaded
    one. A row quarantined for another reason is no original: its corrected resend loads."""
    return (
        f"(_row_number in (select _row_number from (select _row_number, row_number() over "
        f"(partition by {key} order by _row_number) as n from _typed where len(_errors) = 0)"
        f" where n > 1) "
        f"or ({key}) in (select ({key}) from {table}))"
    )


OUTCOME_KEY = "campaign_id, customer_key, event, occurred_at"
# An order line is the same line as another when every one of these is equal (nulls too).
LINE_COLUMNS = (
    "invoice_id",
    "sku",
    "description",
    "quantity",
    "unit_price",
    "invoiced_at",
    "customer_id",
    "country",
)
ALREADY_LOADED = "already loaded by batch"
# Rules across tables, checked after typing on rows that typed cleanly, in order; the first
# that fails is the row's reason. Each is (predicate over _typed, reason as SQL text).
RELATIONAL_RULES: dict[str, list[tuple[str, str]]] = {
    "campaign_outcomes": [
        (
            f"event not in ({_lit(OUTCOME_EVENTS)})",
            f"'event: ' || event || ' is not one of {', '.join(OUTCOME_EVENTS)}'",
        ),
        (
            "campaign_id not in (select campaign_id from marts.campaigns)",
            "'campaign_id: no campaign ' || campaign_id || ' was planned'",
        ),
        (
            "not exists (select 1 from marts.campaign_assignments as a where a.campaign_id ="
            " _typed.campaign_id and a.customer_key = _typed.customer_key)",
            "'customer_key: ' || customer_key || ' is not a customer of campaign ' || campaign_id",
        ),
        (
            "exists (select 1 from marts.campaign_assignments as a where a.campaign_id ="
            " _typed.campaign_id and a.customer_key = _typed.customer_key"
            " and a.group_name = 'control')",
            "'customer_key: ' || customer_key || ' is in the control group of ' || campaign_id"
            " || ', which is never contacted'",
        ),
        (
            "occurred_at < (select c.assigned_at from marts.campaigns as c"
            " where c.campaign_id = _typed.campaign_id)",
            "'occurred_at: ' || occurred_at || ' is before the campaign went out ('"
            " || (select c.assigned_at from marts.campaigns as c"
            " where c.campaign_id = _typed.campaign_id) || ')'",
        ),
        (
            "event <> 'converted' and coalesce(revenue, 0) <> 0",
            "'revenue: ' || revenue || ' on a ' || event || ' event; only conversions carry"
            " revenue'",
        ),
        (
            "event = 'converted' and coalesce(revenue, 0) = 0",
            "'revenue: a converted event needs its revenue (above 0)'",
        ),
        (
            _duplicate(OUTCOME_KEY, "raw.campaign_outcomes"),
            "'event: duplicate ' || event || ' of ' || customer_key || ' in ' || campaign_id"
            " || ' at ' || occurred_at",
        ),
    ],
    "label_feedback": [
        (
            f"label not in ({_lit(LABELS)})",
            f"'label: ' || label || ' is not one of {', '.join(LABELS)}'",
        ),
        *(
            (
                f"label = '{label}' and lower(corrected_value) not in ({_lit(values)})",
                f"'corrected_value: ' || corrected_value || ' is not a {label}"
                f" ({', '.join(values)})'",
            )
            for label, values in LABELS.items()
        ),
        (
            "customer_id not in (select customer_id from raw.customers union all"
            " select customer_id from raw.order_lines where customer_id is not null)",
            "'customer_id: no customer ' || customer_id || ' in the warehouse'",
        ),
        ("valid_to < valid_from", "'valid_to: ' || valid_to || ' is before valid_from'"),
        (
            _duplicate("feedback_id", "raw.label_feedback"),
            "'feedback_id: ' || feedback_id || ' was already sent'",
        ),
    ],
}


def _apply_relational_rules(con: duckdb.DuckDBPyConnection, entity: Entity) -> None:
    for predicate, reason in RELATIONAL_RULES.get(entity.name, []):
        con.execute(
            f"update _typed set _errors = list_append(_errors, {reason})"
            f" where len(_errors) = 0 and ({predicate})"
        )


def _first_failure_sql(entity: Entity) -> str:
    """Column name, all reasons and the raw value of a row's first failing column."""
    names = ", ".join(f"'{c.name}'" for c in entity.columns)
    column = "split_part(_errors[1], ':', 1)"
    return (
        f"{column}, array_to_string(_errors, '; '), _raw_values[list_position([{names}], {column})]"
    )


def _load_relation(
    con: duckdb.DuckDBPyConnection,
    source: Source,
    relation: str,
    batch_id: str,
    loaded_at: datetime,
    ranges: tuple[PlausibleRange, ...],
) -> tuple[int, int]:
    entity = source.entity
    con.execute(f"create or replace temp table _typed as {typing_sql(source, relation, ranges)}")
    _apply_relational_rules(con, entity)
    lineage = "?::varchar, _row_number, ?::timestamp, ?::varchar"
    source_file = source.name
    con.execute(
        f"insert into {entity.table} ({', '.join(entity.column_names)}, "
        f"_source_file, _row_number, _loaded_at, _batch_id) "
        f"select {', '.join(entity.column_names)}, {lineage} from _typed where len(_errors) = 0",
        [source_file, loaded_at, batch_id],
    )
    con.execute(
        "insert into raw.quarantine (_batch_id, _source_file, _row_number, entity, column_name,"
        " reason, raw_value, raw_record, _loaded_at) "
        f"select ?, ?, _row_number, ?, {_first_failure_sql(entity)}, _raw_record, ?"
        " from _typed where len(_errors) > 0",
        [batch_id, source_file, entity.name, loaded_at],
    )
    accepted, quarantined = con.execute(
        "select count(*) filter (len(_errors) = 0), count(*) filter (len(_errors) > 0) from _typed"
    ).fetchone()
    con.execute("drop table _typed")
    return accepted, quarantined


def _move_to_quarantine(
    con: duckdb.DuckDBPyConnection,
    entity: Entity,
    batch_id: str,
    where: str,
    reason_sql: str,
    column_sql: str = "null",
    raw_value_sql: str = "null",
    params: dict | None = None,
) -> int:
    """Move a batch's loaded rows that match ``where`` (SQL over ``lines``, the entity's
    table) to ``raw.quarantine`` with their reason, the whole row kept as JSON; returns how
    many moved (``params``: the named parameters of the reason, column and value SQL). The
    caller keeps the batch's counts and runs it inside its transaction."""
    data = ", ".join(f'"{c}"' for c in entity.column_names)
    selected = f"from {entity.table} as lines where lines._batch_id = $batch and ({where})"
    batch = {"batch": batch_id}
    moved = con.execute(f"select count(*) {selected}", batch).fetchone()[0]
    if moved:
        con.execute(
            "insert into raw.quarantine (_batch_id, _source_file, _row_number, entity,"
            " column_name, reason, raw_value, raw_record, _loaded_at)"
            f" select _batch_id, _source_file, _row_number, '{entity.name}', {column_sql},"
            f" {reason_sql}, {raw_value_sql}, to_json(struct_pack({data}))::varchar, _loaded_at"
            f" {selected}",
            {**batch, **(params or {})},
        )
        con.execute(
            f"delete from {entity.table} where _row_number in"
            f" (select _row_number {selected}) and _batch_id = $batch",
            batch,
        )
    return moved


def _quarantine_lines_loaded_before(
    con: duckdb.DuckDBPyConnection, source: Source, batch_id: str
) -> int:
    """Move the batch's order lines that repeat, to the last column, a line an earlier batch
    loaded (exports that overlap, or the same lines re-exported under another name: ingest
    knows a file again only by its bytes) from ``raw.order_lines`` to ``raw.quarantine``, so
    the marts count each line once. Returns how many moved.

    Every copy of such a line in the batch moves: an invoice already loaded is not loaded
    again. Only the batch's own invoices are looked up, so the cost follows the batch's size.
    """
    entity = source.entity

    def line(alias: str) -> str:
        return "struct_pack(" + ", ".join(f"{c} := {alias}.{c}" for c in LINE_COLUMNS) + ")"

    con.execute(
        f"""create or replace temp table _repeated as
        with earlier as (
            select {line("loaded")} as line, arg_min(_batch_id, _loaded_at) as first_batch
            from {entity.table} as loaded
            where _batch_id <> $batch and invoice_id in (
                select invoice_id from {entity.table} where _batch_id = $batch
            )
            group by all
        )
        select mine._row_number, earlier.first_batch
        from {entity.table} as mine
        inner join earlier on {line("mine")} = earlier.line
        where mine._batch_id = $batch""",
        {"batch": batch_id},
    )
    moved = _move_to_quarantine(
        con,
        entity,
        batch_id,
        "_row_number in (select _row_number from _repeated)",
        f"'invoice_id: the same line was {ALREADY_LOADED} ' || (select first_batch from"
        " _repeated where _repeated._row_number = lines._row_number)"
        " || ' (every column equal); not counted twice'",
        column_sql="'invoice_id'",
        raw_value_sql="lines.invoice_id",
    )
    if moved:
        log.warning(
            "%s: %s order lines were %s an earlier batch: quarantined, not counted twice",
            source.name,
            f"{moved:,}",
            ALREADY_LOADED.replace(" by batch", " by"),
        )
    con.execute("drop table _repeated")
    return moved


def _quarantine_malformed(
    con: duckdb.DuckDBPyConnection,
    source: Source,
    malformed: list[tuple[int, str, str]],
    batch_id: str,
    loaded_at: datetime,
) -> None:
    con.executemany(
        "insert into raw.quarantine values (?, ?, ?, ?, null, ?, ?, ?, ?)",
        [
            (batch_id, source.name, row, source.entity.name, reason, text, text, loaded_at)
            for row, reason, text in malformed
        ],
    )


def ingest_source(
    con: duckdb.DuckDBPyConnection, source: Source, settings: Settings
) -> IngestResult:
    """Load one source as one batch: all of it, or (on any error) nothing.

    Values outside the plausible ranges of ``settings`` (dates judged against the load time)
    are quarantined like values that do not parse.
    """
    ensure_raw_schema(con)
    from valueloop.campaigns import ensure_tables

    ensure_tables(con)  # dbt reads them; feedback is checked against the campaigns it answers
    sha = file_sha256(source.path)
    if source.part:
        sha = hashlib.sha256(f"{sha}#{source.part}".encode()).hexdigest()
    batch_id = f"{source.entity.name}-{sha[:16]}"
    existing = con.execute(
        "select rows_read, rows_accepted, rows_quarantined from raw.ingest_batches"
        " where content_sha256 = ? and entity = ?",
        [sha, source.entity.name],
    ).fetchone()
    if existing:
        return IngestResult(source.name, source.entity.name, batch_id, *existing, True)

    loaded_at = datetime.now(UTC).replace(tzinfo=None)
    ranges = plausible_ranges(settings, loaded_at)[source.entity.name]
    read = accepted = quarantined = 0
    con.execute("begin transaction")
    try:
        if source.relation_sql is not None:
            # Counted from the source itself, so that the accounting below can fail.
            read = con.execute(f"select count(*) from ({source.relation_sql})").fetchone()[0]
            accepted, quarantined = _load_relation(
                con, source, f"({source.relation_sql})", batch_id, loaded_at, ranges
            )
        else:
            assert source.chunks is not None, "a source needs chunks or a relation"
            for chunk in source.chunks:
                read += len(chunk.row_numbers) + len(chunk.malformed)
                if chunk.malformed:
                    _quarantine_malformed(con, source, chunk.malformed, batch_id, loaded_at)
                    quarantined += len(chunk.malformed)
                if chunk.row_numbers:
                    table = pa.table(
                        {
                            **{k: pa.array(v, pa.string()) for k, v in chunk.columns.items()},
                            "_row_number": pa.array(chunk.row_numbers, pa.int64()),
                        }
                    )
                    con.register("_chunk", table)
                    a, q = _load_relation(con, source, "_chunk", batch_id, loaded_at, ranges)
                    con.unregister("_chunk")
                    accepted += a
                    quarantined += q
                log.info("%s: %s rows read", source.name, f"{read:,}")
        if source.entity.name == "order_lines":
            repeated = _quarantine_lines_loaded_before(con, source, batch_id)
            accepted -= repeated
            quarantined += repeated
        if read != accepted + quarantined:
            raise IngestError(
                f"{source.path}: accounting mismatch: read {read}, accepted {accepted},"
                f" quarantined {quarantined}"
            )
        con.execute(
            "insert into raw.ingest_batches values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                batch_id,
                source.name,
                sha,
                source.entity.name,
                source.source_format,
                read,
                accepted,
                quarantined,
                loaded_at,
            ],
        )
        con.execute("commit")
    except BaseException:
        con.execute("rollback")
        raise
    return IngestResult(
        source.name,
        source.entity.name,
        batch_id,
        read,
        accepted,
        quarantined,
        False,
        source.ignored_columns,
    )


@dataclass(frozen=True)
class Withdrawal:
    batch_id: str
    entity: str
    source_file: str
    rows_withdrawn: int
    already: bool  # withdrawn before: nothing changed

    def summary(self) -> str:
        if self.already:
            return f"{self.batch_id} ({self.source_file}) was already withdrawn: nothing changed"
        return (
            f"{self.batch_id} ({self.source_file}): {self.rows_withdrawn:,} {self.entity} rows"
            " moved to raw.quarantine; the next `valueloop transform` builds without them"
        )


def withdraw_batch(con: duckdb.DuckDBPyConnection, batch_id: str, reason: str) -> Withdrawal:
    """Take a loaded batch back out: its accepted rows move to ``raw.quarantine`` with
    ``reason`` (nothing is deleted; rows read = accepted + quarantined still holds for the
    batch), and the raw checkpoint no longer judges it. Withdrawing twice changes nothing."""
    if not reason.strip():
        raise ValueError("say why the batch is withdrawn (--reason): the quarantine keeps it")
    ensure_raw_schema(con)
    found = con.execute(
        "select entity, source_file from raw.ingest_batches where batch_id = ?", [batch_id]
    ).fetchone()
    if found is None:
        latest = [
            r[0]
            for r in con.execute(
                "select batch_id from raw.ingest_batches order by loaded_at desc limit 5"
            ).fetchall()
        ]
        raise LookupError(
            f"no batch {batch_id} in raw.ingest_batches; the latest: {', '.join(latest) or 'none'}"
        )
    entity, source_file = found
    done = con.execute(
        "select rows_withdrawn from raw.withdrawn_batches where batch_id = ?", [batch_id]
    ).fetchone()
    if done is not None:
        return Withdrawal(batch_id, entity, source_file, done[0], True)
    table = ENTITIES[entity].table
    withdrawn_at = datetime.now(UTC).replace(tzinfo=None)
    con.execute("begin transaction")
    try:
        moved = _move_to_quarantine(
            con,
            ENTITIES[entity],
            batch_id,
            "true",
            "$reason",
            params={"reason": f"batch withdrawn: {reason.strip()}"},
        )
        con.execute(
            "update raw.ingest_batches set rows_accepted = rows_accepted - ?,"
            " rows_quarantined = rows_quarantined + ? where batch_id = ?",
            [moved, moved, batch_id],
        )
        con.execute(
            "insert into raw.withdrawn_batches values (?, ?, ?, ?, ?)",
            [batch_id, entity, moved, reason.strip(), withdrawn_at],
        )
        con.execute("commit")
    except BaseException:
        con.execute("rollback")
        raise
    log.info("withdrew %s: %s rows of %s to raw.quarantine", batch_id, f"{moved:,}", table)
    return Withdrawal(batch_id, entity, source_file, moved, False)


def export_quarantine(con: duckdb.DuckDBPyConnection, batch_id: str, folder: Path) -> Path | None:
    """Write a batch's quarantined rows to CSV for people to open; None when there are none."""
    count = con.execute(
        "select count(*) from raw.quarantine where _batch_id = ?", [batch_id]
    ).fetchone()[0]
    if not count:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{batch_id}.csv"
    con.execute(
        f"copy (select * from raw.quarantine where _batch_id = $1 order by _row_number)"
        f" to '{target.as_posix()}' (header, delimiter ',')",
        [batch_id],
    )
    return target


__all__ = ["ENTITIES", "IngestError", "IngestResult", "Source", "SourceChunk", "ingest_source"]
