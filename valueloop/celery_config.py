"""Celery settings for the distributed stack: Airflow's, plus warm workers.

Airflow 3's Celery worker forks a fresh process for every task. Each of our tasks then
imports what it runs: dbt for every model of the dbt group (2.6 s of a task that runs its
model in under one), Great Expectations for the checkpoints (4 s), torch, MLflow and the
models for training and scoring (5 s). Celery's ``imports`` loads them once, in the worker
before it forks, so every task starts with them in memory (shared pages, not copies).
Set with ``AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS=valueloop.celery_config.CELERY_CONFIG``
(the native stack and ``docker-compose.yml`` do); leaving it out changes only start-up time.

Importing is all it does: nothing here connects, starts threads or touches a GPU, so forking
after it is safe.
"""

from __future__ import annotations

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

WARM_IMPORTS = (
    "dbt.cli.main",
    "dbt.adapters.duckdb",
    "great_expectations",
    "valueloop.quality.runner",
    "valueloop.pipeline",
    "ml.score",
)

CELERY_CONFIG = {**DEFAULT_CELERY_CONFIG, "imports": WARM_IMPORTS}
