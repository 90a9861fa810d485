"""What a data engineer and a data scientist look at, in a real browser after a real run.

Playwright drives Debian's Chromium (the Makefile installs it; browsers cannot be downloaded
here) against the Airflow UI and the MLflow UI, each served on the platform's own stores.
Screenshots go to test-artifacts/ui/ so a person can look at what the tests saw.
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from shutil import which

import pytest

from tests.conftest import REPO_ROOT, airflow_api_server, free_port, list_runs, serving
from valueloop import orchestration
from valueloop.config import Settings

CHROMIUM = which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = REPO_ROOT / "test-artifacts" / "ui"
# Chromium's own background traffic is refused on a closed network: switch it off.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MODELS = ("transformer", "lightgbm", "bg_nbd", "rfm_rule", "ensemble")
TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium",
    ),
]


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser) -> Iterator:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    # Assertions too (their own default is 5 s: MLflow's UI missed it on busy cores).
    expect.set_options(timeout=TIMEOUT_MS)
    yield page
    page.close()


def shoot(page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_airflow_ui_lists_the_dags_their_runs_and_a_readable_task_log(
    pipeline_run: Settings, page
) -> None:
    from playwright.sync_api import expect

    settings = pipeline_run
    with airflow_api_server(settings) as base:
        page.goto(f"{base}/dags")
        page.get_by_label("Username").fill(orchestration.ADMIN_USER)
        page.get_by_label("Password").fill(orchestration.admin_password(settings))
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(re.compile(r".*/dags$"))
        for dag_id in orchestration.ALL_DAG_IDS:
            expect(page.get_by_role("link", name=dag_id, exact=True)).to_be_visible()
        expect(page.get_by_text(f"{len(orchestration.ALL_DAG_IDS)} Dags")).to_be_visible()
        shoot(page, "airflow-dags")

        (run,) = [r for r in list_runs(settings, "score_customers") if r["state"] == "success"]
        page.goto(f"{base}/dags/score_customers/runs")
        expect(page.get_by_role("link", name=run["run_id"])).to_be_visible()
        expect(page.get_by_text("Success").first).to_be_visible()
        shoot(page, "airflow-runs")

        page.goto(f"{base}/dags/score_customers/runs/{run['run_id']}/tasks/publish")
        expect(page.get_by_text("published marts.customer_scores").first).to_be_visible()
        shoot(page, "airflow-task-log")


@pytest.fixture(scope="module")
def mlflow_ui(pipeline_run: Settings) -> Iterator[str]:
    """The MLflow UI on the platform's tracking store; yields its URL."""
    settings = pipeline_run
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "ui", "--port", str(port)]
    command += ["--host", "127.0.0.1", "--backend-store-uri", settings.mlflow_tracking_uri]
    command += ["--default-artifact-root", settings.mlflow_artifacts_dir.as_uri()]
    base = f"http://127.0.0.1:{port}"
    with serving(command, dict(os.environ), f"{base}/health"):
        yield base


def _experiment(settings: Settings):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("valueloop")
    runs = client.search_runs([experiment.experiment_id])
    by_model = {
        r.data.tags["valueloop.model"]: r.info.run_id
        for r in runs
        if r.data.tags.get("valueloop.kind") in ("baseline", "challenger")
    }
    return experiment.experiment_id, by_model


def test_mlflow_ui_shows_the_runs_side_by_side_and_the_champion(
    pipeline_run: Settings, mlflow_ui: str, page
) -> None:
    from playwright.sync_api import expect

    experiment_id, runs = _experiment(pipeline_run)
    assert set(runs) == set(MODELS)

    page.goto(f"{mlflow_ui}/#/experiments/{experiment_id}/runs")
    expect(page.get_by_text("Training runs").first).to_be_visible()
    parent = page.get_by_role("row").filter(has_text=re.compile(r"train-\d{8}T\d{6}"))
    parent.locator("button[data-component-id*='runnamecellrenderer']").click()
    for model in MODELS:
        expect(page.get_by_role("link", name=model, exact=True)).to_be_visible()
    shoot(page, "mlflow-experiment")

    ids = urllib.parse.quote(json.dumps(list(runs.values())))
    experiments = urllib.parse.quote(json.dumps([experiment_id]))
    page.goto(f"{mlflow_ui}/#/compare-runs?runs={ids}&experiments={experiments}")
    expect(page.get_by_text(f"Comparing {len(runs)} Runs")).to_be_visible()
    for metric in ("test_customer_score", "test_churn_roc_auc", "test_tier_macro_f1"):
        expect(page.get_by_text(metric, exact=True).first).to_be_visible()
    for model in MODELS:
        expect(page.get_by_text(model, exact=True).first).to_be_visible()
    # The page scrolls inside its own pane: bring the metrics table into the screenshot by its
    # heading (scrolling to a metric's label scrolls the label column apart from the values).
    page.get_by_text("Metrics", exact=True).first.scroll_into_view_if_needed()
    shoot(page, "mlflow-compare")

    page.goto(f"{mlflow_ui}/#/models/valueloop-customer-model")
    champion = page.get_by_role("row").filter(has_text="@ champion")
    expect(champion).to_have_count(1)
    expect(champion.get_by_role("link", name=re.compile(r"Version \d+"))).to_be_visible()
    shoot(page, "mlflow-registered-model")
