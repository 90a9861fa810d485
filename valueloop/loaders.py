"""Loaders: turn a shop's files into :class:`~valueloop.ingest.Source` objects.

Three families of input map onto the one raw contract:

* the demo shop simulator's folder of Parquet files;
* UCI Online Retail and Online Retail II (CSV, gzipped CSV or the original XLSX);
* a generic transactions export (CSV, TSV, whitespace-separated text or Parquet) described by
  a :class:`TransactionsMapping`.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from valueloop.contract import (
    CUSTOMERS,
    FEEDBACK_ENTITIES,
    ORDER_LINES,
    PRODUCTS,
    REVIEWS,
    Entity,
)
from valueloop.ingest import DEFAULT_TIMESTAMP_FORMATS, IngestError, Source, SourceChunk

CHUNK_ROWS = 200_000
FORMATS = ("simulator", "online-retail", "transactions", "feedback")
WHITESPACE = "whitespace"


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --------------------------------------------------------------------------- readers


def _open_text(path: Path, encoding: str) -> io.TextIOBase:
    # utf-8-sig drops a BOM; undecodable bytes become U+FFFD, which ingest quarantines.
    if encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
        encoding = "utf-8-sig"
    # The wrapper owns the binary handle and closes it; callers use it as a context manager.
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding=encoding, errors="replace", newline="")


def _split_records(handle: io.TextIOBase, delimiter: str) -> Iterator[list[str]]:
    if delimiter == WHITESPACE:
        for line in handle:
            yield line.split()
    else:
        yield from csv.reader(handle, delimiter=delimiter, strict=False)


def unique_header(source: str, columns: list[str]) -> list[str]:
    """The header, or an error naming its repeated column names (each column must be one)."""
    counts = Counter(columns)
    repeated = [f"'{name}'" if name else "a blank name" for name, n in counts.items() if n > 1]
    if repeated:
        raise IngestError(
            f"{source}: the header names {', '.join(repeated)} more than once; give every"
            " column its own name"
        )
    return columns


def first_record(path: Path, delimiter: str = ",", encoding: str = "utf-8") -> list[str]:
    """The file's first record, stripped (a header, or the first row of a file without one)."""
    with _open_text(path, encoding) as handle:
        for record in _split_records(handle, delimiter):
            if record:
                return [field.strip() for field in record]
    raise IngestError(f"{path}: the file is empty (no header row)")


def read_header(path: Path, delimiter: str = ",", encoding: str = "utf-8") -> list[str]:
    return unique_header(str(path), first_record(path, delimiter, encoding))


def iter_delimited(
    path: Path,
    columns: list[str],
    delimiter: str = ",",
    header: bool = True,
    encoding: str = "utf-8",
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[SourceChunk]:
    """Stream records as string chunks; a record with the wrong field count is malformed."""
    width = len(columns)
    chunk = SourceChunk({c: [] for c in columns}, [])
    row_number = 0
    seen_header = not header
    with _open_text(path, encoding) as handle:
        for record in _split_records(handle, delimiter):
            if not record or (len(record) == 1 and not record[0].strip()):
                continue  # blank line: not a record
            if not seen_header:
                seen_header = True
                continue
            row_number += 1
            if len(record) != width:
                text = (" " if delimiter == WHITESPACE else delimiter).join(record)
                chunk.malformed.append(
                    (row_number, f"expected {width} fields, found {len(record)}", text)
                )
            else:
                for name, value in zip(columns, record, strict=True):
                    chunk.columns[name].append(value)
                chunk.row_numbers.append(row_number)
            if len(chunk.row_numbers) + len(chunk.malformed) >= chunk_rows:
                yield chunk
                chunk = SourceChunk({c: [] for c in columns}, [])
    if not seen_header:
        raise IngestError(f"{path}: the file is empty (no header row)")
    yield chunk


def xlsx_sheets(path: Path) -> list[str]:
    import openpyxl

    workbook = openpyxl.load_workbook(path, read_only=True)
    try:
        return list(workbook.sheetnames)
    finally:
        workbook.close()


def iter_xlsx(
    path: Path, sheet: str, chunk_rows: int = CHUNK_ROWS
) -> tuple[list[str], Iterator[SourceChunk]]:
    import openpyxl

    workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    rows = workbook[sheet].iter_rows(values_only=True)
    header_row = next(rows, None)
    if header_row is None:
        workbook.close()
        raise IngestError(f"{path}#{sheet}: the sheet is empty (no header row)")
    columns = [str(v).strip() if v is not None else "" for v in header_row]
    # A sheet read this way is padded to its widest row: blank header cells at the end are
    # not columns (a value under one has no name to map, as in a CSV with extra fields).
    while columns and not columns[-1]:
        columns.pop()
    try:
        unique_header(f"{path}#{sheet}", columns)
    except IngestError:
        workbook.close()
        raise

    def chunks() -> Iterator[SourceChunk]:
        try:
            chunk = SourceChunk({c: [] for c in columns}, [])
            for row_number, row in enumerate(rows, start=1):
                if all(v is None for v in row):
                    continue
                for name, value in zip(columns, row, strict=False):
                    chunk.columns[name].append(None if value is None else str(value))
                chunk.row_numbers.append(row_number)
                if len(chunk.row_numbers) >= chunk_rows:
                    yield chunk
                    chunk = SourceChunk({c: [] for c in columns}, [])
            yield chunk
        finally:
            workbook.close()

    return columns, chunks()


def parquet_relation(path: Path) -> tuple[list[str], str]:
    """Column names and a DuckDB relation of the file's columns as text plus _row_number."""
    import duckdb

    literal = "'" + path.as_posix().replace("'", "''") + "'"
    columns = [
        row[0] for row in duckdb.sql(f"describe select * from read_parquet({literal})").fetchall()
    ]
    selects = ", ".join(f"{quote(c)}::varchar as {quote(c)}" for c in columns)
    sql = (
        f"select {selects}, file_row_number + 1 as _row_number "
        f"from read_parquet({literal}, file_row_number = true)"
    )
    return columns, sql


# --------------------------------------------------------------------------- formats


def _require_columns(path: Path, found: list[str], needed: list[str], fmt: str) -> None:
    missing = [c for c in needed if c not in found]
    if missing:
        raise IngestError(
            f"{path}: the header does not fit format '{fmt}': missing column(s) "
            f"{', '.join(missing)}; found {', '.join(found) or 'no columns'}"
        )


def _identity_source(path: Path, entity: Entity, fmt: str) -> Source:
    columns, sql = parquet_relation(path)
    _require_columns(path, columns, entity.column_names, fmt)
    mapping = {c: quote(c) for c in entity.column_names}
    return Source(path, entity, fmt, mapping, relation_sql=sql)


def simulator_sources(folder: Path) -> list[Source]:
    """The simulator's Parquet files, in load order; the latent truth is never ingested."""
    if not folder.is_dir():
        raise IngestError(f"{folder}: the simulator format expects the folder `generate` wrote")
    plan: list[tuple[Entity, list[Path]]] = [
        (PRODUCTS, [folder / "products.parquet"]),
        (CUSTOMERS, [folder / "customers.parquet"]),
        (ORDER_LINES, sorted((folder / "order_lines").glob("*.parquet"))),
        (REVIEWS, [folder / "reviews.parquet"]),
    ]
    missing = [str(p) for _, paths in plan for p in paths if not p.exists()]
    if missing or not plan[2][1]:
        raise IngestError(
            f"{folder}: not a simulator output folder; missing "
            f"{', '.join(missing) or 'order_lines/*.parquet'}"
        )
    return [_identity_source(p, entity, "simulator") for entity, paths in plan for p in paths]


FEEDBACK_SUFFIXES = (".csv", ".csv.gz", ".parquet")


def _feedback_source(path: Path, entity: Entity, chunk_rows: int) -> Source:
    """One feedback file: CSV (header row) or Parquet with the contract's column names."""
    if path.suffix.lower() == ".parquet":
        columns, sql = parquet_relation(path)
    else:
        columns, sql = read_header(path), None
    needed = [c.name for c in entity.columns if c.required]
    _require_columns(path, columns, needed, f"feedback ({entity.name})")
    mapping = {c: quote(c) for c in entity.column_names if c in columns}
    unused = tuple(c for c in columns if c not in entity.column_names)
    if sql is not None:
        return Source(path, entity, "feedback", mapping, relation_sql=sql, ignored_columns=unused)
    chunks = iter_delimited(path, columns, chunk_rows=chunk_rows)
    return Source(path, entity, "feedback", mapping, chunks=chunks, ignored_columns=unused)


def feedback_sources(path: Path, chunk_rows: int = CHUNK_ROWS) -> list[Source]:
    """Outcome and label files. The entity is the folder a file lies in
    (``campaign_outcomes/`` or ``label_feedback/``); ``path`` is a file, one of those folders,
    or the folder holding them (``landing/feedback``)."""
    by_name = {e.name: e for e in FEEDBACK_ENTITIES}
    names = ", ".join(by_name)

    def files(folder: Path) -> list[Path]:
        return sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name.endswith(FEEDBACK_SUFFIXES)
        )

    if path.is_file():
        if path.parent.name not in by_name:
            raise IngestError(f"{path}: a feedback file lies in a folder named {names}")
        return [_feedback_source(path, by_name[path.parent.name], chunk_rows)]
    if path.name in by_name:
        return [_feedback_source(p, by_name[path.name], chunk_rows) for p in files(path)]
    folders = [path / name for name in by_name if (path / name).is_dir()]
    if not folders:
        raise IngestError(f"{path}: no feedback folders ({names}) in it")
    return [
        _feedback_source(p, by_name[folder.name], chunk_rows)
        for folder in folders
        for p in files(folder)
    ]


# UCI Online Retail (2011) and Online Retail II (2009-2011) name the same facts differently.
ONLINE_RETAIL_VARIANTS = {
    "online-retail": {
        "invoice_id": "InvoiceNo",
        "sku": "StockCode",
        "description": "Description",
        "quantity": "Quantity",
        "invoiced_at": "InvoiceDate",
        "unit_price": "UnitPrice",
        "customer_id": "CustomerID",
        "country": "Country",
    },
    "online-retail-ii": {
        "invoice_id": "Invoice",
        "sku": "StockCode",
        "description": "Description",
        "quantity": "Quantity",
        "invoiced_at": "InvoiceDate",
        "unit_price": "Price",
        "customer_id": "Customer ID",
        "country": "Country",
    },
}
# ISO first, then the US layout of the CSV copies that circulate (12/1/2010 8:26).
ONLINE_RETAIL_TIMESTAMPS = (*DEFAULT_TIMESTAMP_FORMATS, "%m/%d/%Y %H:%M", "%m/%d/%Y %H:%M:%S")


def _unused(header: list[str], used: list[str]) -> tuple[str, ...]:
    return tuple(c for c in header if c not in used)


def _online_retail_mapping(path: Path, header: list[str]) -> dict[str, str]:
    for columns in ONLINE_RETAIL_VARIANTS.values():
        if columns["invoice_id"] in header:
            _require_columns(path, header, list(columns.values()), "online-retail")
            mapping = {k: quote(v) for k, v in columns.items()}
            # Customer ids are written as floats (17850.0) in the CSV and XLSX copies.
            mapping["customer_id"] = (
                f"regexp_replace(trim({quote(columns['customer_id'])}), '\\.0+$', '')"
            )
            return mapping
    _require_columns(
        path, header, list(ONLINE_RETAIL_VARIANTS["online-retail"].values()), "online-retail"
    )
    raise AssertionError("unreachable")


def online_retail_sources(path: Path, chunk_rows: int = CHUNK_ROWS) -> list[Source]:
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        sources = []
        for sheet in xlsx_sheets(path):
            header, chunks = iter_xlsx(path, sheet, chunk_rows)
            mapping = _online_retail_mapping(path, header)
            sources.append(
                Source(
                    path,
                    ORDER_LINES,
                    "online-retail",
                    mapping,
                    chunks=chunks,
                    timestamp_formats=ONLINE_RETAIL_TIMESTAMPS,
                    part=sheet,
                    ignored_columns=_unused(header, _online_retail_columns(header)),
                )
            )
        return sources
    header = read_header(path)
    mapping = _online_retail_mapping(path, header)
    chunks = iter_delimited(path, header, chunk_rows=chunk_rows)
    return [
        Source(
            path,
            ORDER_LINES,
            "online-retail",
            mapping,
            chunks=chunks,
            timestamp_formats=ONLINE_RETAIL_TIMESTAMPS,
            ignored_columns=_unused(header, _online_retail_columns(header)),
        )
    ]


def _online_retail_columns(header: list[str]) -> list[str]:
    for columns in ONLINE_RETAIL_VARIANTS.values():
        if columns["invoice_id"] in header:
            return list(columns.values())
    return []


@dataclass(frozen=True)
class TransactionsMapping:
    """Which columns of a shop's own export hold which facts, and how the file is laid out."""

    customer_col: str
    timestamp_col: str
    amount_col: str | None = None
    quantity_col: str | None = None
    price_col: str | None = None
    order_col: str | None = None
    sku_col: str | None = None
    description_col: str | None = None
    country_col: str | None = None
    delimiter: str | None = None  # None: from the suffix (.tsv tab, .txt whitespace, else comma)
    header: bool = True
    names: tuple[str, ...] = ()  # column names for a file without a header
    date_format: str | None = None
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        if self.amount_col and (self.quantity_col or self.price_col):
            raise ValueError("give either an amount column or quantity and price columns, not both")
        if not self.amount_col and not (self.quantity_col and self.price_col):
            raise ValueError("give an amount column, or both a quantity and a price column")

    def resolved_delimiter(self, path: Path) -> str:
        if self.delimiter:
            return {"tab": "\t", "\\t": "\t", "comma": ",", "space": WHITESPACE}.get(
                self.delimiter, self.delimiter
            )
        suffix = (
            path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
        )
        return {".tsv": "\t", ".txt": WHITESPACE}.get(suffix.lower(), ",")

    def source_columns(self) -> list[str]:
        cols = [
            self.customer_col,
            self.timestamp_col,
            self.amount_col,
            self.quantity_col,
            self.price_col,
            self.order_col,
            self.sku_col,
            self.description_col,
            self.country_col,
        ]
        return [c for c in cols if c]

    def to_contract(self) -> dict[str, str]:
        mapping = {
            "customer_id": quote(self.customer_col),
            "invoiced_at": quote(self.timestamp_col),
            "quantity": quote(self.quantity_col) if self.quantity_col else "'1'",
            "unit_price": quote(self.price_col or self.amount_col or ""),
            # Without an order id, one customer's purchases at one instant form one order.
            "invoice_id": quote(self.order_col)
            if self.order_col
            else f"{quote(self.customer_col)} || '@' || {quote(self.timestamp_col)}",
        }
        for contract_col, col in (
            ("sku", self.sku_col),
            ("description", self.description_col),
            ("country", self.country_col),
        ):
            if col:
                mapping[contract_col] = quote(col)
        return mapping


def transactions_sources(
    path: Path, mapping: TransactionsMapping, chunk_rows: int = CHUNK_ROWS
) -> list[Source]:
    formats = (mapping.date_format,) if mapping.date_format else DEFAULT_TIMESTAMP_FORMATS
    contract = mapping.to_contract()
    if path.suffix.lower() == ".parquet":
        columns, sql = parquet_relation(path)
        _require_columns(path, columns, mapping.source_columns(), "transactions")
        return [
            Source(
                path,
                ORDER_LINES,
                "transactions",
                contract,
                relation_sql=sql,
                timestamp_formats=formats,
                ignored_columns=_unused(columns, mapping.source_columns()),
            )
        ]
    delimiter = mapping.resolved_delimiter(path)
    if mapping.header:
        columns = read_header(path, delimiter, mapping.encoding)
    else:
        first = first_record(path, delimiter, mapping.encoding)  # raises on an empty file
        columns = list(mapping.names) or [f"column_{i}" for i in range(1, len(first) + 1)]
        unique_header(f"{path} (--names)", columns)
    _require_columns(path, columns, mapping.source_columns(), "transactions")
    chunks = iter_delimited(path, columns, delimiter, mapping.header, mapping.encoding, chunk_rows)
    return [
        Source(
            path,
            ORDER_LINES,
            "transactions",
            contract,
            chunks=chunks,
            timestamp_formats=formats,
            ignored_columns=_unused(columns, mapping.source_columns()),
        )
    ]
