"""The Celery workers' warm-up: connected to the worker's own start signal, and a module that
cannot be imported is logged and skipped, not fatal (the stack test runs it in real workers)."""

from __future__ import annotations

import logging
import sys

import pytest

pytest.importorskip(
    "airflow.providers.celery",
    reason="needs the stack's packages (requirements-stack.txt): `make test` installs them",
)

from celery.signals import celeryd_init

from valueloop import celery_config


def test_only_a_starting_worker_warms_up_and_a_broken_module_does_not_stop_it(
    monkeypatch, caplog
) -> None:
    assert any(
        getattr(receiver(), "__name__", None) == "warm_up" for _, receiver in celeryd_init.receivers
    )
    monkeypatch.setattr(celery_config, "WARM_IMPORTS", ("json", "valueloop_no_such_module"))
    monkeypatch.delitem(sys.modules, "json")
    monkeypatch.setattr(celery_config.gc, "freeze", lambda: None)  # not this test process
    with caplog.at_level(logging.INFO, logger=celery_config.__name__):
        imported = celery_config.warm_up(sender="worker1@test")
    assert imported == ["json"] and "json" in sys.modules
    assert "could not import valueloop_no_such_module" in caplog.text
    assert "warm-up: imported json" in caplog.text
    # The settings are Airflow's own otherwise.
    from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

    assert celery_config.CELERY_CONFIG == DEFAULT_CELERY_CONFIG
