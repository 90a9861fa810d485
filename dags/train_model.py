"""
### train_model

Runs when a retraining trigger fires (the retrain asset, updated by `ingest_and_transform` and
`ingest_feedback` with the reasons), and weekly on Mondays at 04:00 UTC. **plan** reads why:
the customer model retrains on no champion, new label corrections, drift or the schedule; the
uplift model on new campaign outcomes or the schedule. It decides again as the run starts: a
request that queued behind the training that answered it retrains nothing. A manual run
retrains both, unless its conf names the reasons (`{"customer_model": [...], "uplift_model":
[...]}`), as `valueloop run` does with what `decide_retraining` decided.
**snapshot_training_data** copies the training set out of the warehouse (under the warehouse
pool, seconds); **train** then trains the transformer and the baselines on the same splits
without holding the warehouse, logs them to MLflow with the reason and runs the
champion/challenger gate; **train_uplift** does the same for the uplift model. Only when a
challenger is promoted, or the first training installs a champion (a classic model, when the
challenger lost its gate), does **announce_customer_champion** (or, for the uplift model,
**announce_uplift_champion**) update the champion asset, which triggers `score_customers`.

The training config comes from `VALUELOOP_TRAIN_CONFIG` (default `ml/configs/default.yaml`).
Under the CeleryExecutor the train task goes to the queue `VALUELOOP_TRAIN_QUEUE` (default
`default`; `gpu` is the GPU trainer of `docker-compose.yml`).
"""

from datetime import UTC, datetime

from airflow.sdk import dag, task
from airflow.timetables.assets import AssetOrTimeSchedule
from airflow.timetables.trigger import CronTriggerTimetable

from valueloop.assets import CHAMPION, RETRAIN
from valueloop.config import load_settings
from valueloop.orchestration import DEFAULT_ARGS, WAREHOUSE_POOL

SETTINGS = load_settings()  # environment only: no I/O at parse time


@dag(
    dag_id="train_model",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 4 * * 1", timezone="UTC"), assets=[RETRAIN]
    )
    if SETTINGS.schedules
    else [RETRAIN],  # off: retrain requests and manual runs only
    start_date=datetime(2025, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["valueloop", "ml", "mlflow"],
    doc_md=__doc__,
)
def train_model():
    # Deciding again reads the warehouse: under its pool.
    @task(pool=WAREHOUSE_POOL)
    def plan(triggering_asset_events=None, dag_run=None) -> dict:
        """Which models to retrain and why: what the retrain requests that triggered the run
        asked for, if their triggers still fire now (``valueloop.retraining.plan``)."""
        from valueloop import retraining

        requested: dict[str, list[str]] = {"customer_model": [], "uplift_model": []}
        for key, events in (triggering_asset_events or {}).items():
            if getattr(key, "name", None) != RETRAIN.name:
                continue  # keys are assets (or their unique keys) across Airflow versions
            for event in events:
                for model in requested:
                    requested[model] += (event.extra or {}).get(model, [])
        asked = requested["customer_model"] or requested["uplift_model"]
        now = retraining.decide(load_settings()) if asked else None
        return retraining.plan(
            requested,
            now,
            dag_run.run_type if dag_run else None,
            (dag_run.conf or {}) if dag_run else None,
        )

    # Reading the marts needs the warehouse free of writers (DuckDB locks the file): copy
    # them out under the pool, then train (minutes to hours) without holding it.
    @task(pool=WAREHOUSE_POOL)
    def snapshot_training_data(reasons: dict, run_id=None) -> str:
        from valueloop import pipeline

        if not reasons["customer_model"]:
            return ""
        return str(pipeline.snapshot_training_data(load_settings(), run_id))

    @task(queue=SETTINGS.train_queue)
    def train(snapshot: str, reasons: dict) -> dict:
        from pathlib import Path

        from valueloop import pipeline

        if not snapshot:
            return {"promoted": False, "reason": "no customer-model trigger fired"}
        why = "; ".join(reasons["customer_model"])
        return pipeline.train_and_gate(load_settings(), Path(snapshot), why)

    @task(pool=WAREHOUSE_POOL)
    def train_uplift(reasons: dict) -> dict:
        from valueloop import pipeline

        if not reasons["uplift_model"]:
            return {"promoted": False, "reason": "no uplift trigger fired"}
        return pipeline.train_uplift(load_settings(), "; ".join(reasons["uplift_model"]))

    # Each model announces its own new champion (the first one included): a failed branch
    # fails its own announcement and the run, and hides nothing the other one promoted.
    @task.short_circuit
    def customer_promoted(customer: dict) -> bool:
        return bool(customer.get("champion_changed") or customer["promoted"])

    @task(outlets=[CHAMPION])
    def announce_customer_champion(customer: dict) -> str:
        return f"customer model: {customer['reason']}"

    @task.short_circuit
    def uplift_promoted(uplift: dict) -> bool:
        return bool(uplift["promoted"])

    @task(outlets=[CHAMPION])
    def announce_uplift_champion(uplift: dict) -> str:
        return f"uplift model: {uplift['reason']}"

    reasons = plan()
    customer = train(snapshot_training_data(reasons), reasons)
    uplift = train_uplift(reasons)
    customer_promoted(customer) >> announce_customer_champion(customer)
    uplift_promoted(uplift) >> announce_uplift_champion(uplift)


train_model()
