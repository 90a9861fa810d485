"""Score: every customer with the champion, segmented, validated, then published atomically.

1. Load ``models:/<name>@champion``; stream ``marts.scoring_set`` (read-only) in chunks
   through it, embeddings kept in an on-disk memmap, so memory stays bounded.
2. Segment the embeddings (K-Means, k by silhouette) and name the segments.
3. Write the candidate to schema ``scoring``; dbt adds churn bands and next best actions.
4. The ``scores`` checkpoint validates the candidate; a critical failure stops here and the
   published tables stay as they were.
5. Publish in one transaction: ``marts.customer_scores``, ``marts.segment_summary``, and the
   run appended to ``marts.customer_scores_history`` (re-running a run id replaces it). Then
   the BI views, a BI snapshot (Parquet files and a small DuckDB file of views over them,
   which BI tools read instead of the warehouse) and the HTML report (also logged to MLflow).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import mlflow
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ml import reasons, registry
from ml.config import TrainConfig
from ml.data import to_model_input
from ml.report import segment_map, write_report
from ml.segment import fit_segments, name_segments
from valueloop import bi_snapshot, monitoring, transform
from valueloop.config import Settings, path_safe
from valueloop.quality.checks import table_columns
from valueloop.quality.runner import run_checkpoint
from valueloop.warehouse import connect

log = logging.getLogger(__name__)

CANDIDATE = "scoring.scored_customers"
CANDIDATE_SUMMARY = "scoring.segment_summary_candidate"
PUBLISHED = ("customer_scores", "segment_summary")
SCORING_EXPERIMENT = "valueloop-scoring"


@dataclass(frozen=True)
class ScoringReport:
    run_id: str
    model_version: str
    customers: int
    segments: int
    silhouette: float
    report_path: Path
    snapshot_dir: Path
    tier_mix: dict[str, float]

    def summary(self) -> str:
        mix = ", ".join(f"{k} {v:.1%}" for k, v in self.tier_mix.items())
        return (
            f"scored {self.customers:,} customers with champion v{self.model_version} "
            f"(run {self.run_id}): {mix}; {self.segments} segments (silhouette "
            f"{self.silhouette:.3f})\npublished marts.customer_scores, "
            f"marts.segment_summary, marts.customer_scores_history\n"
            f"report: {self.report_path}\nBI snapshot (Parquet + bi.duckdb): {self.snapshot_dir}"
        )


def has_champion(settings: Settings, cfg: TrainConfig | None = None) -> bool:
    """Whether a model is champion: on a first deployment the marts arrive before training
    has promoted one, and scoring then waits (the champion asset triggers it) rather than
    fail."""
    cfg = cfg or TrainConfig.load(settings.train_config)
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    if registry.champion_version(client, cfg.registered_model) is None:
        log.warning(
            "%s has no champion yet: nothing to score with; scoring runs when training "
            "promotes one (the champion asset triggers it)",
            cfg.registered_model,
        )
        return False
    return True


def drift_reference(tracking_uri: str, model_run_id: str) -> tuple[dict | None, str | None]:
    """The drift reference logged by the training run that produced the champion (the model's
    own run or a run it is nested in: the stack's run sits under the transformer's, under the
    training run), with that run's id; (None, None) for a model trained before references
    were logged."""
    client = mlflow.MlflowClient(tracking_uri)
    run: str | None = model_run_id
    while run:
        if monitoring.REFERENCE_ARTIFACT in {a.path for a in client.list_artifacts(run)}:
            path = client.download_artifacts(run, monitoring.REFERENCE_ARTIFACT)
            return json.loads(Path(path).read_text()), run
        run = client.get_run(run).data.tags.get("mlflow.parentRunId")
    log.warning(
        "the champion's run %s logged no %s: drift is measured against today's training set",
        model_run_id,
        monitoring.REFERENCE_ARTIFACT,
    )
    return None, None


def _champion(tracking_uri: str, name: str):
    client = mlflow.MlflowClient(tracking_uri)
    version = registry.champion_version(client, name)
    if version is None:
        raise LookupError(f"{name} has no champion yet; run `valueloop train` first")
    details = client.get_model_version(name, version)
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pyfunc.load_model(f"models:/{name}@{registry.CHAMPION}"), version, details.run_id


def _stream_predictions(
    model, warehouse: Path, batch_rows: int, work: Path, batch_size: int, explain: bool = True
) -> tuple[pd.DataFrame, np.memmap]:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        total = con.execute("select count(*) from marts.scoring_set").fetchall()[0][0]
        if total == 0:
            raise ValueError("marts.scoring_set is empty: nothing to score")
        reader = con.sql("select * from marts.scoring_set order by customer_id").to_arrow_reader(
            batch_rows
        )
        parts, embeddings, done = [], None, 0
        python_model = model.unwrap_python_model()
        explained = getattr(python_model, "baseline", None) if explain else None
        sequence_model = explain and hasattr(python_model, "vocab")
        with tqdm(total=total, desc="score", unit="customer") as bar:
            for batch in reader:
                chunk = to_model_input(batch.to_pandas())
                out = model.predict(
                    chunk, params={"return_embedding": True, "batch_size": batch_size}
                )
                emb = out.filter(like="embedding_").to_numpy(dtype="float32")
                if embeddings is None:
                    embeddings = np.memmap(
                        work / "embeddings.f32",
                        dtype="float32",
                        mode="w+",
                        shape=(total, emb.shape[1]),
                    )
                embeddings[done : done + len(chunk)] = emb
                why = (
                    reasons.explain(explained, chunk, out["value_tier"])
                    if explained is not None
                    else reasons.explain_sequence(
                        python_model.net,
                        python_model.vocab,
                        python_model.scaler,
                        chunk,
                        published=out["value_tier"],
                    )
                    if sequence_model
                    else None
                )
                if why is None:
                    why = pd.DataFrame(
                        {c: [None] * len(chunk) for c in ("churn_reasons", "tier_reasons")}
                    )
                parts.append(
                    pd.concat(
                        [
                            chunk[["customer_id", "as_of"]].reset_index(drop=True),
                            out.drop(columns=out.filter(like="embedding_").columns).reset_index(
                                drop=True
                            ),
                            why.reset_index(drop=True).astype(object),
                        ],
                        axis=1,
                    )
                )
                done += len(chunk)
                bar.update(len(chunk))
    return pd.concat(parts, ignore_index=True), embeddings


def _publish(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
    """One transaction: the candidate becomes the published tables, history gets the run."""
    con.execute("begin transaction")
    con.execute(f"create or replace table marts.customer_scores as select * from {CANDIDATE}")
    con.execute(
        f"create or replace table marts.segment_summary as select * from {CANDIDATE_SUMMARY}"
    )
    con.execute(
        f"create table if not exists marts.customer_scores_history as "
        f"select * from {CANDIDATE} where false"
    )
    con.execute("delete from marts.customer_scores_history where scoring_run_id = ?", [run_id])
    history = {r[0] for r in con.execute("describe marts.customer_scores_history").fetchall()}
    for name, sql_type, *_ in con.execute(f"describe {CANDIDATE}").fetchall():
        if name not in history:  # a column added in a later release
            con.execute(f'alter table marts.customer_scores_history add column "{name}" {sql_type}')
    con.execute(f"insert into marts.customer_scores_history by name select * from {CANDIDATE}")
    con.execute("commit")


def _first_scored_at(settings: Settings, run_id: str) -> datetime | None:
    """When a run id was first scored: a rerun keeps it, so that the history keeps the runs
    in the order they were made and the rerun leaves the same tables."""
    with connect(settings.warehouse_path) as con:
        if not table_columns(con, "marts.customer_scores_history"):
            return None
        return con.execute(
            "select min(scored_at) from marts.customer_scores_history where scoring_run_id = ?",
            [run_id],
        ).fetchone()[0]


def _report_stem(run_id: str) -> str:
    return "scoring_" + path_safe(run_id)


def score_candidates(
    settings: Settings,
    run_id: str,
    cfg: TrainConfig | None = None,
    batch_rows: int = 20_000,
    batch_size: int = 256,
    k_range: tuple[int, int] = (3, 8),
    seed: int = 42,
) -> dict:
    """Step 1: predict, segment and write the candidate (published tables untouched)."""
    cfg = cfg or TrainConfig.load(settings.train_config)
    model, version, model_run_id = _champion(settings.mlflow_tracking_uri, cfg.registered_model)
    scored_at = _first_scored_at(settings, run_id) or datetime.now(UTC).replace(tzinfo=None)
    reports = settings.home / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    stem = _report_stem(run_id)
    with tempfile.TemporaryDirectory(prefix="valueloop-score-") as tmp:
        predictions, embeddings = _stream_predictions(
            model,
            settings.warehouse_path,
            batch_rows,
            Path(tmp),
            batch_size,
            settings.score_reasons,
        )
        segmentation = fit_segments(np.asarray(embeddings), *k_range, seed)
        segment = segmentation.assign(embeddings)
        names = name_segments(
            segment, predictions["p_high"].to_numpy(), predictions["churn_probability"].to_numpy()
        )
        figure = segment_map(embeddings, segment, {s: n for s, (n, _, _) in names.items()})
        figure.savefig(reports / f"{stem}_map.png", dpi=90)
    predictions["segment_id"] = segment.astype("int64")
    predictions["segment_name"] = [names[s][0] for s in segment]
    segments = pd.DataFrame(
        [
            {
                "segment_id": s,
                "segment_name": n,
                "segment_value_level": v,
                "segment_churn_level": c,
                "scoring_run_id": run_id,
            }
            for s, (n, v, c) in sorted(names.items())
        ]
    )
    predictions = predictions.assign(
        model_name=cfg.registered_model,
        model_version=str(version),
        model_run_id=model_run_id,
        scoring_run_id=run_id,
        scored_at=scored_at,
    )
    uplift = uplift_candidates(settings, predictions)
    with connect(settings.warehouse_path) as con:
        con.execute("create schema if not exists scoring")
        con.register("_uplift", uplift)
        con.execute(
            "create or replace table scoring.candidate_uplift as select"
            " customer_id::varchar as customer_id, action::varchar as action,"
            " expected_incremental_profit::double as expected_incremental_profit,"
            " profit_std_error::double as profit_std_error,"
            " profit_shared_std_error::double as profit_shared_std_error,"
            " action_policy::varchar as action_policy from _uplift"
        )
        con.register("_predictions", predictions)
        con.register("_segments", segments)
        con.execute(
            "create or replace table scoring.candidate_predictions as select * from _predictions"
        )
        con.execute("create or replace table scoring.candidate_segments as select * from _segments")
    transform.run_dbt(settings, ["build", "--select", f"tag:{transform.SCORING_TAG}"], quiet=True)
    reference, reference_run = drift_reference(settings.mlflow_tracking_uri, model_run_id)
    # Drift of the customers scored here, measured now: publishing may come after the marts
    # have moved on.
    with connect(settings.warehouse_path, read_only=True) as con:
        drift = monitoring.feature_drift(
            con, reference, f"champion v{version}'s training data (run {reference_run})"
        )
    measured_at = datetime.now(UTC).replace(tzinfo=None)
    stats = {
        "run_id": run_id,
        "model_name": cfg.registered_model,
        "model_version": str(version),
        "drift_reference_run": reference_run,
        "feature_drift": _drift_records(drift),
        "drift_measured_at": measured_at.isoformat(),
        "customers": len(predictions),
        "k": segmentation.k,
        "silhouette_by_k": {str(k): v for k, v in segmentation.silhouette_by_k.items()},
        "calinski_harabasz": segmentation.calinski_harabasz,
    }
    (reports / f"{stem}_segmentation.json").write_text(json.dumps(stats, indent=2))
    return stats


def _uplift_frame(settings: Settings, predictions: pd.DataFrame) -> pd.DataFrame:
    """The uplift features of the customers in ``predictions``: their scores, and their
    behaviour from the scoring set."""
    from ml import uplift

    behaviour = [f for f in uplift.FEATURES if f not in predictions.columns]
    with connect(settings.warehouse_path) as con:
        features = con.execute(
            f"select customer_id, {', '.join(behaviour)} from marts.scoring_set"
        ).df()
    return predictions[["customer_id", "p_high", "churn_probability"]].merge(
        features, on="customer_id", how="left"
    )


def policy_target(settings: Settings):
    """The customers the next campaign would act on, for the uplift gate: the published
    scores with the playbook's action and the eligible actions of each, and the policy's
    settings (``ml.uplift.PolicyTarget``). None before the first scoring run."""
    from ml import uplift
    from valueloop.campaigns import eligible_actions, load_actions

    with connect(settings.warehouse_path) as con:
        if "playbook_action" not in table_columns(
            con, "marts.customer_scores"
        ):  # never scored, or scored before it was kept
            return None
        scores = con.execute(
            "select customer_id, p_high, churn_probability, value_tier, churn_risk_band,"
            " playbook_action from marts.customer_scores order by customer_id"
        ).df()
    actions = load_actions(settings)
    return uplift.PolicyTarget(
        frame=_uplift_frame(settings, scores),
        playbook=scores["playbook_action"].to_numpy(object),
        eligible=[
            eligible_actions(actions, t, b)
            for t, b in zip(scores["value_tier"], scores["churn_risk_band"], strict=True)
        ],
        costs={a.name: a.cost for a in actions.values()},
        bounded=frozenset(a.name for a in actions.values() if a.discount == 0),
        margin=settings.margin_rate,
        confidence_z=settings.uplift_confidence_z,
        unsubscribe_cost=settings.unsubscribe_cost,
    )


def uplift_candidates(settings: Settings, predictions: pd.DataFrame) -> pd.DataFrame:
    """Each action's expected incremental profit per customer, from the uplift champion (long
    format; dbt picks the best eligible action). Empty, with its columns, before there is one:
    the playbook then decides."""
    from ml import uplift

    columns = [
        "customer_id",
        "action",
        "expected_incremental_profit",
        "profit_std_error",
        "profit_shared_std_error",
        "action_policy",
    ]
    champion = uplift.load_champion(settings.mlflow_tracking_uri)
    if champion is None:
        return pd.DataFrame(
            {c: pd.Series(dtype="float64" if "profit" in c else "object") for c in columns}
        )
    model, version = champion
    frame = _uplift_frame(settings, predictions)
    from valueloop.campaigns import load_actions

    costs = {a.name: a.cost for a in load_actions(settings).values()}
    profit = uplift.expected_profits(
        model, frame, costs, settings.margin_rate, settings.unsubscribe_cost
    )
    ids = frame["customer_id"].to_numpy()
    long = profit.assign(customer_id=ids).melt(
        id_vars="customer_id", var_name="action", value_name="expected_incremental_profit"
    )
    if hasattr(model, "std_errors"):
        scale = uplift.profit_error_scale(model, settings.margin_rate)
        errors = (model.std_errors(frame) * pd.Series(scale).abs()).assign(customer_id=ids)
        long = long.merge(
            errors.melt(id_vars="customer_id", var_name="action", value_name="profit_std_error"),
            on=["customer_id", "action"],
        )
    else:
        long["profit_std_error"] = 0.0
    if hasattr(model, "shared_std_errors"):
        scale = uplift.profit_error_scale(model, settings.margin_rate)
        shared = (model.shared_std_errors(frame) * pd.Series(scale)).assign(customer_id=ids)
        long = long.merge(
            shared.melt(
                id_vars="customer_id", var_name="action", value_name="profit_shared_std_error"
            ),
            on=["customer_id", "action"],
        )
    else:
        long["profit_shared_std_error"] = 0.0
    return long.assign(action_policy=f"uplift-v{version}")[columns]


def _drift_records(drift: pd.DataFrame) -> list[dict]:
    """Feature drift as the stats JSON carries it: NaN as null, since the score task returns
    the stats to Airflow, whose XCom refuses NaN (a feature no customer has: no reviews)."""
    return drift.astype(object).where(drift.notna(), None).to_dict("records")


def _drift_frame(stats: dict) -> pd.DataFrame | None:
    """The feature drift the scoring step measured (nulls back to NaN), if it did."""
    if "feature_drift" not in stats:
        return None
    frame = pd.DataFrame(stats["feature_drift"])
    numbers = ["psi", "reference_mean", "current_mean"]
    return frame.astype(dict.fromkeys(numbers, "float64"))


def check_candidates(settings: Settings, run_id: str):
    """Step 2: the scores checkpoint on the candidate; a critical failure raises."""
    return run_checkpoint(settings, "scores", run_id=run_id, scores_table=CANDIDATE)


def publish(settings: Settings, run_id: str) -> ScoringReport:
    """Step 3: publish atomically, then BI views, BI snapshot, report and MLflow run."""
    reports = settings.home / "reports"
    stem = _report_stem(run_id)
    stats = json.loads((reports / f"{stem}_segmentation.json").read_text())
    with connect(settings.warehouse_path) as con:
        candidate_runs = con.execute(f"select distinct scoring_run_id from {CANDIDATE}").fetchall()
        if candidate_runs != [(run_id,)]:
            raise ValueError(
                f"the candidate in {CANDIDATE} belongs to {candidate_runs}, not "
                f"to run {run_id}; score that run first"
            )
        _publish(con, run_id)
    transform.run_dbt(settings, ["build", "--select", f"tag:{transform.BI_VIEWS_TAG}"], quiet=True)
    with connect(settings.warehouse_path) as con:
        snapshot_dir = bi_snapshot.publish_snapshot(
            con,
            settings.exports_dir,
            run_id,
            timedelta(hours=settings.bi_snapshot_retention_hours),
        )
        report_path = write_report(
            con, run_id, stats, reports / f"{stem}_map.png", reports / f"{stem}.html"
        )
        horizon = con.execute("select max(horizon_days) from marts.customer_labels").fetchone()[0]
        monitoring.write_html(
            monitoring.record(
                con,
                run_id,
                int(horizon),
                # A candidate scored before drift was measured at scoring: measured here.
                stats.get("drift_reference"),
                f"champion v{stats['model_version']}'s training data"
                f" (run {stats.get('drift_reference_run')})",
                measured=_drift_frame(stats),
                measured_at=datetime.fromisoformat(stats["drift_measured_at"])
                if "drift_measured_at" in stats
                else None,
            ),
            run_id,
            reports / f"{stem}_monitoring.html",
        )
        tier_mix = dict(
            con.execute(
                "select value_tier, count(*) / sum(count(*)) over () from marts.customer_scores"
                " group by 1 order by 1"
            ).fetchall()
        )
    _log_to_mlflow(settings, run_id, stats, report_path, tier_mix)
    silhouette = stats["silhouette_by_k"][str(stats["k"])]
    return ScoringReport(
        run_id,
        stats["model_version"],
        stats["customers"],
        stats["k"],
        silhouette,
        report_path,
        snapshot_dir,
        tier_mix,
    )


def score(
    settings: Settings,
    run_id: str,
    cfg: TrainConfig | None = None,
    batch_rows: int = 20_000,
    batch_size: int = 256,
) -> ScoringReport:
    """All three steps, as `valueloop score` runs them."""
    score_candidates(settings, run_id, cfg, batch_rows, batch_size)
    check_candidates(settings, run_id)
    return publish(settings, run_id)


def _log_to_mlflow(
    settings: Settings, run_id: str, stats: dict, report_path: Path, tier_mix: dict[str, float]
) -> None:
    registry.configure(
        settings.mlflow_tracking_uri, settings.mlflow_artifacts_dir, SCORING_EXPERIMENT
    )
    with mlflow.start_run(run_name=f"score-{run_id}"):
        mlflow.set_tags({"valueloop.kind": "scoring", "scoring_run_id": run_id})
        mlflow.log_params(
            {
                "model_name": stats["model_name"],
                "model_version": stats["model_version"],
                "k": stats["k"],
                "customers": stats["customers"],
            }
        )
        mlflow.log_metrics(
            {
                "silhouette": stats["silhouette_by_k"][str(stats["k"])],
                "calinski_harabasz": stats["calinski_harabasz"],
                **{f"silhouette_k{k}": v for k, v in stats["silhouette_by_k"].items()},
                **{f"tier_share_{k}": v for k, v in tier_mix.items()},
            }
        )
        stem = report_path.stem  # this run's files only: another run's stem can start with it
        parts = (".html", "_map.png", "_segments.csv", "_segmentation.json", "_monitoring.html")
        for part in parts:
            path = report_path.with_name(stem + part)
            if path.exists():
                mlflow.log_artifact(str(path), artifact_path="report")
