"""What the Airflow tasks call: thin, importable steps over the same functions as the CLI.

Tasks pass only paths, ids and small summaries between each other (XCom stays small).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from valueloop import jobs, loaders
from valueloop.config import Settings, path_safe

log = logging.getLogger(__name__)

# landing/<format>/... : a folder per format; a transactions file brings its mapping as
# <file>.mapping.json (the keyword arguments of TransactionsMapping).
LANDING_FORMATS = ("simulator", "online-retail", "transactions")


def land(settings: Settings) -> list[dict[str, str]]:
    """The files waiting in the landing folder, in a stable order, with their format."""
    found: list[dict[str, str]] = []
    for fmt in LANDING_FORMATS:
        folder = settings.landing_dir / fmt
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or path.name.endswith(".mapping.json"):
                continue
            if fmt == "simulator" and not path.is_dir():
                continue
            found.append({"path": str(path), "format": fmt})
    log.info("landing: %d item(s) in %s", len(found), settings.landing_dir)
    return found


def _mapping(path: Path) -> loaders.TransactionsMapping:
    mapping_file = path.with_name(path.name + ".mapping.json")
    if not mapping_file.exists():
        raise FileNotFoundError(
            f"{path}: a transactions file needs {mapping_file.name} beside "
            "it with its column mapping"
        )
    try:
        fields = json.loads(mapping_file.read_text())
        if not isinstance(fields, dict):
            raise TypeError("expected a JSON object of mapping fields")
        return loaders.TransactionsMapping(**fields)
    except (ValueError, TypeError) as error:  # bad JSON, unknown or missing field, bad value
        known = ", ".join(f.name for f in dataclasses.fields(loaders.TransactionsMapping))
        raise loaders.IngestError(
            f"{mapping_file}: not a transactions mapping ({error}); its fields: {known}"
        ) from error


def ingest_landed(
    settings: Settings, items: list[dict[str, str]], keep_going: bool = False
) -> dict[str, object]:
    """Ingest every landed item (already-loaded files are skipped); returns the totals.

    A file that cannot be read as its format (a missing column, say) stops the ingest; with
    ``keep_going`` the files after it are loaded all the same, and ``rejected`` names each
    one that failed and why (each file is a batch of its own: all of it or nothing)."""
    totals: dict[str, object] = {"files": 0, "read": 0, "accepted": 0, "quarantined": 0}
    totals |= {"skipped": 0, "rejected": []}
    for item in items:
        path = Path(item["path"])
        try:
            mapping = _mapping(path) if item["format"] == "transactions" else None
            report = jobs.ingest_path(settings, path, item["format"], mapping)
        except Exception as error:  # one file's failure, whatever it is: named below
            if not keep_going:
                raise
            named = str(error) if str(path) in str(error) else f"{path}: {error}"
            why = (
                named
                if isinstance(error, loaders.IngestError)
                else f"{type(error).__name__}: {named}"
            )
            log.error("not loaded: %s", why)
            totals["rejected"].append(why)
            continue
        log.info("%s", report.summary())
        totals["files"] += len(report.results)
        totals["skipped"] += sum(r.skipped for r in report.results)
        totals["read"] += report.rows_read
        totals["accepted"] += report.rows_accepted
        totals["quarantined"] += report.rows_quarantined
    return totals


def marts_need_building(totals: dict, run_type: str) -> bool:
    """Whether ``ingest_and_transform`` goes on past ingest: always for a run someone
    triggered (new dbt models, a withdrawn batch: they know why), and for a scheduled one
    when a file was read or data loaded earlier was never built (``unbuilt``: a run whose build
    failed). A scheduled run with nothing new would rebuild the same marts, and the marts
    asset would rescore the same customers and measure the same drift again, a retraining
    trigger that fires on no new data."""
    if run_type != "scheduled":  # a str enum in the task context: str() gives its name
        return True
    needed = totals["read"] > 0 or totals["unbuilt"] > 0
    if not needed:
        log.info("nothing new since the marts were last built: the rest of the run is skipped")
    return needed


def snapshot_training_data(settings: Settings, run_id: str) -> Path:
    """What training reads, copied out of the warehouse into ``training/<run>`` (the two most
    recent snapshots are kept), so that training does not hold the warehouse."""
    from ml.data import snapshot_training_data as snapshot

    root = settings.training_dir
    folder = snapshot(settings.warehouse_path, root / path_safe(run_id))
    older = sorted((p for p in root.iterdir() if p != folder), key=lambda p: p.stat().st_mtime)
    for stale in older[:-1]:
        shutil.rmtree(stale)
    return folder


def train_and_gate(
    settings: Settings, source: Path | None = None, reason: str = "manual"
) -> dict[str, object]:
    """Train, evaluate and gate; returns whether the challenger was promoted and whether the
    champion changed (a first champion included). ``source`` is a
    training snapshot (default: read the warehouse directly); ``reason`` is what triggered
    it, recorded in MLflow."""
    import mlflow

    from ml import registry
    from ml.config import TrainConfig
    from ml.train import train

    cfg = TrainConfig.load(settings.train_config)
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    before = registry.champion_version(client, cfg.registered_model)
    report = train(
        cfg,
        source or settings.warehouse_path,
        settings.mlflow_tracking_uri,
        settings.mlflow_artifacts_dir,
        settings.home / "cache",
        reason,
    )
    log.info("%s", report.summary())
    return {
        "promoted": report.decision.promote,
        # Also true when the first training installs a classic champion (the challenger lost
        # its gate): there was none before, and scoring waits for one.
        "champion_changed": str(report.champion_version) != str(before),
        "challenger": report.challenger_version,
        "champion": report.champion_version,
        "reason": report.decision.reason,
    }


def train_uplift(settings: Settings, reason: str = "manual") -> dict[str, object]:
    """Train and gate the uplift model on the randomised outcomes (ml/uplift.py)."""
    from ml import uplift
    from ml.score import policy_target
    from valueloop.campaigns import load_actions

    report = uplift.train(
        settings.warehouse_path,
        settings.mlflow_tracking_uri,
        settings.mlflow_artifacts_dir,
        settings.uplift_min_outcomes,
        reason,
        discounts={a.name: a.discount for a in load_actions(settings).values()},
        n_bootstrap=settings.uplift_gate_bootstrap,
        target=policy_target(settings),
        gate=settings.uplift_gate,
    )
    log.info("%s", report.summary())
    return {
        "trained": report.trained,
        "promoted": report.promoted,
        "champion": report.champion,
        "reason": report.reason,
        "summary": report.summary(),
    }


def decide_retraining(settings: Settings) -> dict:
    """The loop's retraining triggers (valueloop/retraining.py), as a small dict for XCom."""
    from valueloop.retraining import decide

    decision = decide(settings)
    log.info("retraining: %s; facts: %s", decision.reason, decision.facts)
    return decision.as_dict()


def land_feedback(settings: Settings) -> list[dict[str, str]]:
    """Feedback files waiting in landing/feedback (already-loaded ones are skipped at ingest)."""
    found, other = [], []
    for entity in ("campaign_outcomes", "label_feedback"):
        folder = settings.feedback_dir / entity
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if not p.is_file() or p.name.startswith("."):
                    continue
                if p.name.endswith(loaders.FEEDBACK_SUFFIXES):
                    found.append({"path": str(p), "format": "feedback"})
                else:
                    other.append(p)
    if other:
        # Not feedback (a note, a spreadsheet): left where it is, as the folder scan of
        # `valueloop ingest` leaves it, and named so that nobody waits for it to load.
        log.warning(
            "feedback landing: left alone %d file(s) that are not %s: %s",
            len(other),
            " / ".join(loaders.FEEDBACK_SUFFIXES),
            ", ".join(str(p) for p in other),
        )
    log.info("feedback landing: %d file(s) in %s", len(found), settings.feedback_dir)
    return found
