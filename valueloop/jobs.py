"""The platform's jobs: what the CLI and the Airflow tasks both call."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from valueloop import loaders
from valueloop.config import Settings
from valueloop.ingest import (
    IngestError,
    IngestResult,
    Withdrawal,
    export_quarantine,
    ingest_source,
    withdraw_batch,
)
from valueloop.simulator import SimulationConfig, SimulationSummary, generate
from valueloop.warehouse import connect

log = logging.getLogger(__name__)


def generate_demo(
    settings: Settings,
    customers: int | None = None,
    seed: int | None = None,
    out_dir: Path | None = None,
    keep_existing: bool = False,
) -> SimulationSummary:
    """Write the demo shop. With ``keep_existing``, a shop already generated with the same
    size and seed is kept as it is, with the months the loop has played since."""
    cfg = SimulationConfig(
        customers=settings.demo_customers if customers is None else customers,
        seed=settings.demo_seed if seed is None else seed,
    )
    out = out_dir or settings.demo_dir
    manifest = out / "manifest.json"
    if keep_existing and manifest.exists():
        found = json.loads(manifest.read_text())
        if found.get("customers") == cfg.customers and found.get("seed") == cfg.seed:
            return SimulationSummary(
                str(out),
                found["n_customers"],
                found["n_products"],
                found["n_orders"],
                found["n_order_lines"],
                found["n_reviews"],
            )
    return generate(out, cfg)


def sources_for(
    path: Path,
    source_format: str,
    mapping: loaders.TransactionsMapping | None = None,
    chunk_rows: int = loaders.CHUNK_ROWS,
) -> list:
    path = path.resolve()
    if not path.exists():
        raise IngestError(f"{path}: no such file or folder")
    if source_format == "simulator":
        return loaders.simulator_sources(path)
    if source_format == "online-retail":
        return loaders.online_retail_sources(path, chunk_rows)
    if source_format == "transactions":
        if mapping is None:
            raise IngestError(f"{path}: the transactions format needs a column mapping")
        return loaders.transactions_sources(path, mapping, chunk_rows)
    if source_format == "feedback":
        return loaders.feedback_sources(path, chunk_rows)
    raise IngestError(
        f"unknown format {source_format!r}; choose one of {', '.join(loaders.FORMATS)}"
    )


@dataclass(frozen=True)
class IngestReport:
    results: list[IngestResult]
    quarantine_files: list[Path]

    @property
    def rows_read(self) -> int:
        return sum(r.rows_read for r in self.results if not r.skipped)

    @property
    def rows_accepted(self) -> int:
        return sum(r.rows_accepted for r in self.results if not r.skipped)

    @property
    def rows_quarantined(self) -> int:
        return sum(r.rows_quarantined for r in self.results if not r.skipped)

    def summary(self) -> str:
        lines = [r.summary() for r in self.results]
        lines.append(
            f"total: read {self.rows_read:,}, accepted {self.rows_accepted:,}, "
            f"quarantined {self.rows_quarantined:,}"
            + (
                f" ({sum(r.skipped for r in self.results)} file(s) already loaded)"
                if any(r.skipped for r in self.results)
                else ""
            )
        )
        lines += [f"quarantined rows written to {p}" for p in self.quarantine_files]
        return "\n".join(lines)


def ingest_path(
    settings: Settings,
    path: Path,
    source_format: str,
    mapping: loaders.TransactionsMapping | None = None,
) -> IngestReport:
    """Ingest a file (or the simulator's folder): one batch per file, each all or nothing."""
    results, exports = [], []
    sources = sources_for(path, source_format, mapping)  # headers are checked before any write
    with connect(settings.warehouse_path) as con:
        for source in sources:
            result = ingest_source(con, source, settings)
            log.info(result.summary())
            results.append(result)
            if not result.skipped and result.rows_quarantined:
                exported = export_quarantine(con, result.batch_id, settings.quarantine_dir)
                if exported:
                    exports.append(exported)
    return IngestReport(results, exports)


def withdraw(settings: Settings, batch_id: str, reason: str) -> tuple[Withdrawal, Path | None]:
    """Take a loaded batch out of the raw tables into the quarantine (``withdraw_batch``) and
    rewrite its quarantine file for people to open."""
    if not settings.warehouse_path.exists():
        raise FileNotFoundError(f"{settings.warehouse_path}: no warehouse yet")
    with connect(settings.warehouse_path) as con:
        withdrawal = withdraw_batch(con, batch_id, reason)
        exported = export_quarantine(con, batch_id, settings.quarantine_dir)
    return withdrawal, exported
