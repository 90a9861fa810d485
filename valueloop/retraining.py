"""When to retrain: the loop's triggers, whichever comes first, each with its reason.

* **uplift model**: enough new matured randomised outcomes since it was last trained
  (``VALUELOOP_RETRAIN_MIN_OUTCOMES``), and at least ``VALUELOOP_UPLIFT_MIN_OUTCOMES`` in all;
* **customer model**: no champion yet; enough new label corrections since its last training
  (``VALUELOOP_RETRAIN_MIN_CORRECTIONS``); a feature or score drift (PSI) in the latest
  monitoring run at or past ``VALUELOOP_RETRAIN_DRIFT_PSI``, measured since its last training
  started (a drift that a retraining already answered, promoted or not, fires again only when
  a later scoring run measures it again); or its last training is older than
  ``VALUELOOP_RETRAIN_EVERY_DAYS`` (the schedule).

What counts as "since the last training" is read from MLflow (the last run that finished or
is running, not one that failed; the outcomes and corrections a run trained on are its
parameters), so the decision is the same wherever it is taken. A run still marked running
a day after it started was killed without MLflow hearing of it, and counts as crashed.

A retrain request can queue behind the training it asked for (requests are decided while a
training runs): ``train_model`` decides again when it starts (:func:`plan`), and a model
whose triggers no longer fire is not trained again on what its last training saw.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

import duckdb
import mlflow
from mlflow import MlflowClient

from valueloop.config import Settings
from valueloop.warehouse import connect


@dataclass(frozen=True)
class RetrainDecision:
    customer_model: list[str] = field(default_factory=list)  # reasons; empty: no retraining
    uplift_model: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    @property
    def any(self) -> bool:
        return bool(self.customer_model or self.uplift_model)

    @property
    def reason(self) -> str:
        parts = [f"customer model: {'; '.join(self.customer_model)}"] if self.customer_model else []
        parts += [f"uplift model: {'; '.join(self.uplift_model)}"] if self.uplift_model else []
        return " | ".join(parts) or "no trigger fired"

    def as_dict(self) -> dict:
        return asdict(self) | {"reason": self.reason}


# A training still "running" after this long was killed without a word (out of memory, a
# lost worker): MLflow never heard that it ended, and it trained nothing.
RUNNING_AT_MOST = timedelta(days=1)


def _latest_run(
    settings: Settings, experiment: str, kind: str, now: datetime | None = None
) -> mlflow.entities.Run | None:
    client = MlflowClient(settings.mlflow_tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(  # a run that crashed trained nothing; one running will have
        [found.experiment_id],
        f"tags.`valueloop.kind` = '{kind}' and attributes.status != 'FAILED'"
        " and attributes.status != 'KILLED'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    stale = ((now or datetime.now(UTC)) - RUNNING_AT_MOST).timestamp() * 1000
    for run in runs:
        if run.info.status == "RUNNING" and run.info.start_time < stale:
            continue
        return run
    return None


def _count(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    try:
        return int(con.execute(sql).fetchone()[0])
    except duckdb.CatalogException:  # the table is not built yet: nothing has come back
        return 0


def _largest_drift(
    con: duckdb.DuckDBPyConnection, since: datetime | None = None
) -> tuple[str, float] | None:
    """The largest PSI of the latest scoring run's monitoring, over the features (against the
    champion's training reference) and the scores (against the previous run, when the same
    model version scored both: a new champion's scores differ by design, not by drift), with
    its name; None before the first monitored scoring run, or when that run's drift was
    computed before ``since`` (UTC)."""
    try:
        row = con.execute(
            "with latest as (select scoring_run_id from monitoring.feature_drift"
            " order by computed_at desc limit 1),"
            " versions as (select scoring_run_id, any_value(model_version) as version"
            " from marts.customer_scores_history group by 1),"
            " measures as (select scoring_run_id, feature as name, psi"
            " from monitoring.feature_drift union all"
            " select drift.scoring_run_id, 'score ' || drift.score, drift.psi"
            " from monitoring.score_drift as drift"
            " inner join versions as now on now.scoring_run_id = drift.scoring_run_id"
            " inner join versions as before on before.scoring_run_id = drift.previous_run_id"
            " where now.version = before.version)"
            " select name, psi from measures where scoring_run_id = (select * from latest)"
            " and (select max(computed_at) from monitoring.feature_drift where scoring_run_id ="
            " (select * from latest)) > ?"
            " and psi is not null and not isnan(psi) order by psi desc, name limit 1",
            [(since or datetime(1970, 1, 1, tzinfo=UTC)).astimezone(UTC).replace(tzinfo=None)],
        ).fetchone()
    except duckdb.CatalogException:  # no scoring run has been monitored yet
        return None
    return (row[0], float(row[1])) if row else None


def decide(settings: Settings, now: datetime | None = None) -> RetrainDecision:
    from ml.config import TrainConfig
    from ml.data import CORRECTIONS_BUILT
    from ml.registry import champion_version
    from ml.uplift import UPLIFT_EXPERIMENT

    now = now or datetime.now(UTC)
    cfg = TrainConfig.load(settings.train_config)
    train_run = _latest_run(settings, cfg.experiment, "training", now)
    # Drift measured after the training data was taken is new to it (a run logged before
    # that time was recorded: its start).
    taken = train_run.data.params.get("data_taken_at") if train_run else None
    trained_at = (
        datetime.fromisoformat(taken)
        if taken
        else datetime.fromtimestamp(train_run.info.start_time / 1000, UTC)
        if train_run
        else None
    )
    with connect(settings.warehouse_path) as con:
        outcomes = _count(
            con, "select count(*) from intermediate.int_campaign_results where is_matured"
        )
        corrections = _count(con, CORRECTIONS_BUILT)  # built into the labels, as training counts
        drift = _largest_drift(con, since=trained_at)

    uplift_run = _latest_run(settings, UPLIFT_EXPERIMENT, "uplift", now)
    trained_on = int(uplift_run.data.params.get("outcomes", 0)) if uplift_run else 0
    uplift: list[str] = []
    new_outcomes = outcomes - trained_on
    if outcomes >= settings.uplift_min_outcomes and new_outcomes >= settings.retrain_min_outcomes:
        uplift.append(
            f"{new_outcomes:,} new randomised outcomes"
            f" (threshold {settings.retrain_min_outcomes:,})"
        )

    customer: list[str] = []
    client = MlflowClient(settings.mlflow_tracking_uri)
    if champion_version(client, cfg.registered_model) is None:
        customer.append("no champion yet")
    seen = int(train_run.data.params.get("label_corrections", 0)) if train_run else 0
    if corrections - seen >= settings.retrain_min_corrections:
        customer.append(
            f"{corrections - seen:,} new label corrections"
            f" (threshold {settings.retrain_min_corrections:,})"
        )
    if drift is not None and drift[1] >= settings.retrain_drift_psi:
        customer.append(
            f"drift: PSI {drift[1]:.3f} of {drift[0]} (threshold {settings.retrain_drift_psi})"
        )
    if train_run is not None:
        age_days = (now.timestamp() * 1000 - train_run.info.start_time) / 86_400_000
        if age_days >= settings.retrain_every_days:
            customer.append(f"schedule: last trained {age_days:.1f} days ago")
    return RetrainDecision(
        customer,
        uplift,
        {
            "matured_outcomes": outcomes,
            "uplift_trained_on": trained_on,
            "label_corrections": corrections,
            "corrections_trained_on": seen,
            "largest_psi": drift[1] if drift else None,
            "largest_psi_of": drift[0] if drift else None,
        },
    )


def plan(
    requested: dict[str, list[str]],
    now: RetrainDecision | None,
    run_type: str | None,
    conf: dict | None,
) -> dict[str, list[str]]:
    """Which models a ``train_model`` run trains, and why.

    ``requested`` holds the reasons of the retrain requests that triggered it (empty for a
    manual or scheduled run), ``now`` what the triggers say as it starts. A requested model
    trains for today's reasons, and not at all when none fires any more (a training that
    ran after the request answered it). A run given its reasons in ``conf`` (`valueloop run`
    passes what decide_retraining decided) trains for those; any other run trains both, for
    the schedule or by hand.
    """
    if requested.get("customer_model") or requested.get("uplift_model"):
        assert now is not None, "a requested run decides again"
        return {
            model: list(getattr(now, model)) if requested.get(model) else []
            for model in ("customer_model", "uplift_model")
        }
    conf = conf or {}
    if "customer_model" in conf or "uplift_model" in conf:
        return {model: list(conf.get(model, [])) for model in ("customer_model", "uplift_model")}
    why = "schedule" if run_type == "scheduled" else "manual run"
    return {"customer_model": [why], "uplift_model": [why]}
