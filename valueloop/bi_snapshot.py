"""BI snapshots: what BI tools read, in files the pipeline never writes into again.

DuckDB allows one writing process, and a process that holds the warehouse open, even
read-only, keeps the pipeline from writing it. So BI tools do not open the warehouse: after
each publish, the BI schema is exported into a new folder ``exports/snapshots/<id>/``, one
Parquet file per table, with ``bi.duckdb`` beside them: a small database of views over those
files, under the warehouse's own schema names, so the same SQL works on both. The link
``exports/current`` then moves to the new folder in one ``rename`` (atomic on POSIX), and
``exports/previous`` to the one before, kept for rollback. Older snapshots are removed once
they stopped being current longer ago than the retention
(``VALUELOOP_BI_SNAPSHOT_RETENTION_HOURS``, default 24): a snapshot records when it was
replaced (``RETIRED``), since one that was current for most of a day may have been opened
minutes before.

A connection opened on ``exports/current/bi.duckdb`` keeps reading the snapshot it opened,
whole, while later runs publish; reconnecting shows the newest. It stays valid for the
retention after the next publish, however many runs publish meanwhile: an analyst's
connection lasts the day.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb

from valueloop.config import path_safe

log = logging.getLogger(__name__)

# What BI reads: the published scores, their BI views, and the BI marts.
BI_TABLES = (
    "marts.customer_scores",
    "marts.segment_summary",
    "marts.customer_scores_history",
    "marts.bi_customer_scores",
    "marts.bi_action_plan",
    "marts.dim_customers",
    "marts.dim_products",
    "marts.fct_orders",
    "marts.fct_order_lines",
    "marts.fct_daily_revenue",
)
DATABASE = "bi.duckdb"
RETIRED = "RETIRED"  # in a snapshot's folder: when it stopped being current (epoch seconds)


def _retire(folder: Path) -> None:
    """Record that ``folder`` stopped being current now."""
    (folder / RETIRED).write_text(f"{time.time():.3f}\n")


def _retired_at(folder: Path) -> float:
    """When ``folder`` stopped being current; a snapshot retired before this was recorded (or
    never marked) by its folder's time, as the retention was counted then."""
    marker = folder / RETIRED
    return float(marker.read_text()) if marker.exists() else folder.stat().st_mtime


def _swap_link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` in one rename: readers see the old or the new, never none."""
    staged = link.with_name(f".{link.name}.next")
    staged.unlink(missing_ok=True)
    staged.symlink_to(target.relative_to(link.parent), target_is_directory=True)
    os.replace(staged, link)


def current(exports_dir: Path) -> Path | None:
    link = exports_dir / "current"
    return link.resolve() if link.is_symlink() else None


def current_database(exports_dir: Path) -> Path:
    """The file a BI tool opens (read-only): always the current snapshot's views."""
    return exports_dir / "current" / DATABASE


def publish_snapshot(
    warehouse: duckdb.DuckDBPyConnection,
    exports_dir: Path,
    label: str,
    retention: timedelta = timedelta(hours=24),
) -> Path:
    """Export the BI tables from an open warehouse connection; returns the new snapshot."""
    snapshots = exports_dir / "snapshots"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    folder = snapshots / f"{stamp}_{path_safe(label)}"
    partial = snapshots / f".{folder.name}.partial"
    partial.mkdir(parents=True)
    for table in BI_TABLES:
        warehouse.execute(
            f"copy {table} to '{(partial / table).as_posix()}.parquet' (format parquet)"
        )
    partial.rename(folder)  # the views below name the final paths
    with duckdb.connect(str(folder / DATABASE)) as bi:
        for schema in sorted({t.split(".")[0] for t in BI_TABLES}):
            bi.execute(f"create schema if not exists {schema}")
        for table in BI_TABLES:
            bi.execute(
                f"create view {table} as select * from "
                f"read_parquet('{(folder / table).as_posix()}.parquet')"
            )
    before = current(exports_dir)
    if before is not None:
        _swap_link(exports_dir / "previous", before)
    _swap_link(exports_dir / "current", folder)
    if before is not None:
        _retire(before)
    keep = {folder, before}
    cutoff = time.time() - retention.total_seconds()
    for old in snapshots.iterdir():  # expired snapshots, and partial ones a crash left behind
        if old not in keep and (old.name.startswith(".") or _retired_at(old) < cutoff):
            shutil.rmtree(old)
    log.info("BI snapshot %s is current (previous: %s)", folder, before)
    return folder


def rollback(exports_dir: Path) -> Path:
    """Point ``current`` back at ``previous`` (and ``previous`` at what was current)."""
    now, before = current(exports_dir), (exports_dir / "previous")
    if now is None or not before.is_symlink():
        raise FileNotFoundError(f"no previous BI snapshot to roll back to in {exports_dir}")
    target = before.resolve()
    _swap_link(exports_dir / "current", target)
    _swap_link(before, now)
    _retire(now)
    (target / RETIRED).unlink(missing_ok=True)  # current again
    return target
