"""Connections to the DuckDB warehouse: one writer at a time, readers open read-only."""

from __future__ import annotations

from pathlib import Path

import duckdb


def connect(path: Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    if read_only and not path.exists():
        raise FileNotFoundError(f"{path}: no warehouse yet; run `valueloop ingest` first")
    path.parent.mkdir(parents=True, exist_ok=True)
    return duckdb.connect(str(path), read_only=read_only)
