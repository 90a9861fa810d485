"""Celery settings for the distributed stack: Airflow's, plus warm workers.

Airflow 3's Celery worker forks a fresh process for every task (on Linux). Each of our tasks
then imports what it runs: dbt for every model of the dbt group (2.6 s of a task that runs
its model in under one), Great Expectations for the checkpoints (4 s), torch, MLflow and the
models for training and scoring (5 s). A Celery worker that loads this module imports them
once, when it starts and before its pool forks, so every task starts with them in memory.
They are then frozen out of the garbage collector's reach (``gc.freeze``, as Airflow does
for its own preloads), so the task processes share those pages instead of copying them.

Set with ``AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS=valueloop.celery_config.CELERY_CONFIG``
(the native stack and ``docker-compose.yml`` do). Only workers warm up (``celeryd_init`` is
a worker's signal: the scheduler and Flower import nothing more). A module that fails to
import is logged and left to the tasks that need it, which then fail with the real error.
"""

from __future__ import annotations

import gc
import importlib
import logging
import time

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG
from celery.signals import celeryd_init

log = logging.getLogger(__name__)

WARM_IMPORTS = (
    "dbt.cli.main",
    "dbt.adapters.duckdb",
    "great_expectations",
    "valueloop.quality.runner",
    "valueloop.pipeline",
    "ml.score",
)

CELERY_CONFIG = dict(DEFAULT_CELERY_CONFIG)


@celeryd_init.connect
def warm_up(**_) -> list[str]:
    """Import :data:`WARM_IMPORTS` in a starting worker; returns the modules imported."""
    started, imported = time.perf_counter(), []
    for name in WARM_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception:  # logged, not hidden: the task that needs it raises it again
            log.exception("warm-up: could not import %s; tasks will import it themselves", name)
        else:
            imported.append(name)
    gc.freeze()
    log.info("warm-up: imported %s in %.1f s", ", ".join(imported), time.perf_counter() - started)
    return imported
