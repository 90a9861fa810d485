"""The `valueloop` command as a user runs it: a real process, a real home folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from tests.conftest import ONLINE_RETAIL_CSV, REPO_ROOT, write_text

VALUELOOP = str(Path(sys.executable).with_name("valueloop"))


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALUELOOP_")}
    env["VALUELOOP_HOME"] = str(home)
    return subprocess.run(
        [VALUELOOP, *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )


@pytest.mark.parametrize("command", [[], ["generate"], ["ingest"], ["run"]])
def test_every_command_has_help(tmp_path: Path, command: list[str]) -> None:
    result = run_cli(*command, "--help", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage: valueloop" in result.stdout


def test_run_without_airflow_goes_from_nothing_to_scores_idempotently(tmp_path: Path) -> None:
    """The direct path of `valueloop run` (the Airflow path is tested in test_dags.py)."""
    args = (
        "run",
        "--customers",
        "600",
        "--seed",
        "5",
        "--no-airflow",
        "--cycles",
        "0",  # the pipeline alone: the loop adds data each turn (tested in test_loop.py)
        "--train-config",
        str(REPO_ROOT / "ml" / "configs" / "tiny.yaml"),
    )
    first = run_cli(*args, home=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    stages = [line.split()[1] for line in first.stdout.splitlines() if line.startswith("✓")]
    assert stages == ["generate", "ingest", "raw", "dbt", "marts", "train", "score", "plan"]
    assert "600 customers" in first.stdout and "0 quarantined" in first.stdout
    assert "(1 new batch(es) this run" not in first.stdout  # four files: four batches
    assert "4 new batch(es) this run" in first.stdout and "champion:" in first.stdout
    assert "marts.customer_scores" in first.stdout and "make mlflow-ui" in first.stdout
    # Tool output stays in the log, not on screen.
    assert len(first.stdout.splitlines()) < 40, first.stdout
    assert "Epoch" not in first.stdout + first.stderr and "dbt" not in first.stderr
    (log,) = (tmp_path / "logs").glob("run-*/valueloop.log")
    assert "Completed successfully" in log.read_text()  # dbt's own output
    second = run_cli(*args, home=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "0 new batch(es) this run" in second.stdout
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as con:
        assert con.execute("select count(*) from raw.customers").fetchone()[0] == 600
        assert con.execute("select count(*) from raw.ingest_batches").fetchone()[0] == 4


def test_run_verbose_shows_the_tools_and_a_failed_stage_says_where(tmp_path: Path) -> None:
    """(Without --verbose the tools' output stays in the log: see the test above.)"""
    broken = write_text(tmp_path / "broken.yaml", "max_epoch: 1\n")  # a typo of max_epochs
    verbose = run_cli(
        "run",
        "--customers",
        "300",
        "--no-airflow",
        "--verbose",
        "--train-config",
        str(broken),
        home=tmp_path,
    )
    assert verbose.returncode == 1
    assert "✓ marts checks" in verbose.stdout and "✗ train + gate" in verbose.stdout
    assert "valueloop run: error:" in verbose.stderr and "'max_epoch'" in verbose.stderr
    assert "Completed successfully" in verbose.stdout  # dbt, straight to the terminal


def test_failures_exit_non_zero_with_an_actionable_message(tmp_path: Path) -> None:
    missing = run_cli(
        "ingest", str(tmp_path / "nope.csv"), "--format", "online-retail", home=tmp_path
    )
    assert missing.returncode == 1 and "nope.csv: no such file" in missing.stderr
    csv = write_text(tmp_path / "a.csv", "who,when,amount\nu1,2024-01-01,3\n")
    no_format = run_cli("ingest", str(csv), home=tmp_path)
    assert no_format.returncode == 1 and "say which --format" in no_format.stderr
    no_mapping = run_cli("ingest", str(csv), "--format", "transactions", home=tmp_path)
    assert no_mapping.returncode == 1 and "--customer-col and --timestamp-col" in no_mapping.stderr
    mapped = run_cli(
        "ingest",
        str(csv),
        "--format",
        "transactions",
        "--customer-col",
        "who",
        "--timestamp-col",
        "when",
        "--amount-col",
        "amount",
        home=tmp_path,
    )
    assert mapped.returncode == 0, mapped.stderr
    assert "read 1, accepted 1, quarantined 0" in mapped.stdout
    bad_choice = run_cli("ingest", str(csv), "--format", "excel", home=tmp_path)
    assert bad_choice.returncode == 2 and "invalid choice" in bad_choice.stderr
    # The loop measures the latest campaign: with none planned, it says what to run first.
    no_campaign = run_cli("loop", home=tmp_path)
    assert no_campaign.returncode == 1, no_campaign.stderr[-2000:]
    assert "no campaign has been planned yet: run `valueloop campaign plan`" in (no_campaign.stderr)


@pytest.mark.dataset
@pytest.mark.skipif(
    not ONLINE_RETAIL_CSV.exists(), reason=f"UCI Online Retail not found at {ONLINE_RETAIL_CSV}"
)
def test_online_retail_loads_with_exact_accounting(tmp_path: Path) -> None:
    result = run_cli("ingest", str(ONLINE_RETAIL_CSV), "--format", "online-retail", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "read 541,909, accepted 541,909, quarantined 0" in result.stdout
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as con:
        rows, customers, total, cancelled, guests = con.execute("""
            select count(*), count(distinct customer_id), round(sum(quantity * unit_price), 2),
                   count(*) filter (invoice_id like 'C%'), count(*) filter (customer_id is null)
            from raw.order_lines
        """).fetchone()
    assert (rows, customers, float(total)) == (541_909, 4_372, 9_747_747.93)
    assert (cancelled, guests) == (9_288, 135_080)


def test_the_summary_says_when_its_model_table_is_from_a_refused_retraining(
    tmp_path: Path,
) -> None:
    """After a retraining the gate refused, the table is that training's, not the champion's."""
    from rich.console import Console

    from valueloop import run_summary
    from valueloop.config import load_settings

    settings = load_settings(home=tmp_path / "home")
    models = {"lightgbm": {"churn_roc_auc": 0.83}, "stack": {"churn_roc_auc": 0.84}}

    def shown(decision: str) -> str:
        console = Console(record=True, width=240)
        champion = run_summary.Champion("1", "stack", decision, "the gate's reason", "stack")
        summary = run_summary.RunSummary([], [], models, champion, {"active": 3}, None)
        run_summary.render(console, summary, settings, tmp_path / "logs")
        return console.export_text()

    assert "on the frozen holdout (★ champion):" in shown("promoted")
    refused = shown("refused")
    assert "the latest training, on its frozen holdout (refused;" in refused
    assert "(★ champion)" not in refused and "stack ★" in refused
