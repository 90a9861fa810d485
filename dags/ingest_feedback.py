"""
### ingest_feedback

Every 10 minutes: takes the campaign outcome and label files waiting in
`$VALUELOOP_HOME/landing/feedback/{campaign_outcomes,label_feedback}/` (a file already loaded
is skipped), and when something new came in (or came in before and was never built: a run
whose build failed is caught up by the next):

1. **ingest**: into `raw.campaign_outcomes` and `raw.label_feedback`; an outcome for an
   unknown campaign or customer, for a control customer, dated before the campaign, repeated,
   or with a revenue that cannot be right is quarantined with its reason;
2. **check_raw**: the Great Expectations `raw` checkpoint;
3. **dbt_feedback**: `dbt build` of everything downstream of the feedback (campaign results
   and performance, the corrected labels, the training set);
4. **decide_retraining**: enough new outcomes or corrections, drift or the schedule update the
   retrain asset with the reasons, which triggers `train_model`.
"""

from datetime import UTC, datetime

from airflow.sdk import dag, task

from valueloop.assets import FEEDBACK
from valueloop.config import load_settings
from valueloop.loop_tasks import retraining_tasks
from valueloop.orchestration import DEFAULT_ARGS, WAREHOUSE_POOL

SETTINGS = load_settings()  # environment only: no I/O at parse time


@dag(
    dag_id="ingest_feedback",
    schedule="*/10 * * * *" if SETTINGS.schedules else None,  # off: triggered runs only
    start_date=datetime(2025, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["valueloop", "loop", "feedback"],
    doc_md=__doc__,
)
def ingest_feedback():
    @task
    def land() -> list[dict[str, str]]:
        from valueloop import pipeline
        from valueloop.config import load_settings

        return pipeline.land_feedback(load_settings())

    @task(pool=WAREHOUSE_POOL)
    def ingest(items: list[dict[str, str]]) -> dict[str, int]:
        from valueloop import pipeline, transform
        from valueloop.config import load_settings

        settings = load_settings()
        # One unreadable file must not hold back the others: they load, and reject_unreadable
        # (beside the build) fails the run naming it.
        totals = pipeline.ingest_landed(settings, items, keep_going=True)
        # Loaded before and never built (a dbt_feedback that failed): built now.
        return {**totals, "unbuilt": transform.feedback_unbuilt(settings)}

    @task
    def reject_unreadable(totals: dict) -> str:
        if totals["rejected"]:
            from valueloop.loaders import IngestError

            raise IngestError(
                "feedback file(s) not loaded (the others were; fix or remove these):\n"
                + "\n".join(totals["rejected"])
            )
        return "every landed file was readable"

    @task.short_circuit
    def anything_new(totals: dict[str, int]) -> bool:
        return totals["read"] > 0 or totals["unbuilt"] > 0

    @task(pool=WAREHOUSE_POOL)
    def check_raw(run_id=None) -> str:
        from valueloop.config import load_settings
        from valueloop.quality.runner import run_checkpoint

        return run_checkpoint(load_settings(), "raw", run_id=run_id).summary()

    @task(pool=WAREHOUSE_POOL, outlets=[FEEDBACK])  # only when new feedback was built
    def dbt_feedback() -> str:
        from valueloop import transform
        from valueloop.config import load_settings

        transform.build_feedback(load_settings())
        return "built everything downstream of the feedback"

    totals = ingest(land())
    built = dbt_feedback()
    anything_new(totals) >> check_raw() >> built
    reject_unreadable(totals)
    retraining_tasks(after=built)


ingest_feedback()
