"""Airflow tasks the loop's DAGs share (imported by DAG files; no I/O at import)."""

from __future__ import annotations

from airflow.sdk import task

from valueloop.assets import RETRAIN
from valueloop.orchestration import WAREHOUSE_POOL


def retraining_tasks(after, trigger_rule: str = "all_success") -> None:
    """``after`` >> decide_retraining >> retraining_needed >> request_retraining (updates the
    retrain asset with the reasons in its extra, which triggers train_model); nothing is
    requested when no trigger fired. ``trigger_rule``: decide_retraining's (``none_failed``
    decides after a build that was skipped, not after one that failed)."""

    @task(pool=WAREHOUSE_POOL, trigger_rule=trigger_rule)
    def decide_retraining() -> dict:
        from valueloop import pipeline
        from valueloop.config import load_settings

        return pipeline.decide_retraining(load_settings())

    @task.short_circuit
    def retraining_needed(decision: dict) -> bool:
        return bool(decision["customer_model"] or decision["uplift_model"])

    @task(outlets=[RETRAIN])
    def request_retraining(decision: dict, *, outlet_events) -> str:
        outlet_events[RETRAIN].extra = {
            "customer_model": decision["customer_model"],
            "uplift_model": decision["uplift_model"],
            "reason": decision["reason"],
        }
        return decision["reason"]

    decision = decide_retraining()
    after >> decision
    retraining_needed(decision) >> request_retraining(decision)
