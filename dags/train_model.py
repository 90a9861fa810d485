"""
### train_model

Runs when the marts asset is updated (after `ingest_and_transform` passes its checks), and
weekly on Mondays at 04:00 UTC. **snapshot_training_data** copies the training set out of the
warehouse (under the warehouse pool, seconds); **train** then trains the transformer and the
baselines on the same splits without holding the warehouse, logs them to MLflow and runs the
champion/challenger gate. Only when the challenger is promoted does **announce_champion**
update the champion asset, which triggers `score_customers`.

The training config comes from `VALUELOOP_TRAIN_CONFIG` (default `ml/configs/default.yaml`).
Under the CeleryExecutor the train task goes to the queue `VALUELOOP_TRAIN_QUEUE` (default
`default`; `gpu` is the GPU trainer of `docker-compose.yml`).
"""

from datetime import UTC, datetime

from airflow.sdk import dag, task
from airflow.timetables.assets import AssetOrTimeSchedule
from airflow.timetables.trigger import CronTriggerTimetable

from valueloop.assets import CHAMPION, MARTS
from valueloop.config import load_settings
from valueloop.orchestration import DEFAULT_ARGS, WAREHOUSE_POOL

SETTINGS = load_settings()  # environment only: no I/O at parse time


@dag(
    dag_id="train_model",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 4 * * 1", timezone="UTC"), assets=[MARTS]
    ),
    start_date=datetime(2025, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["valueloop", "ml", "mlflow"],
    doc_md=__doc__,
)
def train_model():
    # Reading the marts needs the warehouse free of writers (DuckDB locks the file): copy
    # them out under the pool, then train (minutes to hours) without holding it.
    @task(pool=WAREHOUSE_POOL)
    def snapshot_training_data(run_id=None) -> str:
        from valueloop import pipeline

        return str(pipeline.snapshot_training_data(load_settings(), run_id))

    @task(queue=SETTINGS.train_queue)
    def train(snapshot: str) -> dict:
        from pathlib import Path

        from valueloop import pipeline

        return pipeline.train_and_gate(load_settings(), Path(snapshot))

    @task.short_circuit
    def promoted(result: dict) -> bool:
        return bool(result["promoted"])

    @task(outlets=[CHAMPION])
    def announce_champion(result: dict) -> str:
        return f"champion is now version {result['champion']}: {result['reason']}"

    result = train(snapshot_training_data())
    promoted(result) >> announce_champion(result)


train_model()
