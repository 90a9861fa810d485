from pathlib import Path

import pytest

from tests.conftest import run_valueloop
from valueloop.config import load_settings


def test_defaults_live_under_the_home_folder(tmp_path: Path) -> None:
    settings = load_settings(env={}, home=tmp_path)
    assert settings.warehouse_path == tmp_path / "warehouse.duckdb"
    assert settings.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    for path in (
        settings.airflow_home,
        settings.landing_dir,
        settings.quarantine_dir,
        settings.mlflow_artifacts_dir,
        settings.demo_dir,
    ):
        assert path.is_relative_to(tmp_path)


def test_home_comes_from_the_environment_and_each_setting_can_be_overridden(tmp_path: Path) -> None:
    env = {
        "VALUELOOP_HOME": str(tmp_path / "home"),
        "VALUELOOP_WAREHOUSE_PATH": str(tmp_path / "elsewhere" / "w.duckdb"),
        "VALUELOOP_DEMO_CUSTOMERS": "123",
        "VALUELOOP_PII_SALT": "s3cret",
    }
    settings = load_settings(env=env)
    assert settings.home == tmp_path / "home"
    assert settings.warehouse_path == tmp_path / "elsewhere" / "w.duckdb"
    assert settings.landing_dir == tmp_path / "home" / "landing"
    assert settings.demo_customers == 123
    assert settings.pii_salt == "s3cret"


def test_loading_settings_creates_nothing(tmp_path: Path) -> None:
    load_settings(env={}, home=tmp_path / "home")
    assert not (tmp_path / "home").exists()


def test_settings_round_trip_through_the_environment(tmp_path: Path) -> None:
    settings = load_settings(env={}, home=tmp_path)
    assert load_settings(env=settings.as_env()) == settings


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("VALUELOOP_CAMPAIGN_CONTROL_SHARE", "10", r"=10 is outside \[0, 1\): a share"),
        ("VALUELOOP_CAMPAIGN_CONTROL_SHARE", "1", r"=1 is outside \[0, 1\)"),
        ("VALUELOOP_CAMPAIGN_EXPLORATION_SHARE", "-0.1", r"=-0.1 is outside \[0, 1\]"),
        ("VALUELOOP_MARGIN_RATE", "35", r"=35 is outside \[0, 1\]"),
        ("VALUELOOP_CAMPAIGN_BUDGET", "-5", "=-5 is negative"),
        ("VALUELOOP_CAMPAIGN_WINDOW_DAYS", "0", "=0 is under a day"),
    ],
)
def test_a_share_or_rate_out_of_range_is_refused_naming_it(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    with pytest.raises(ValueError, match=name + message):
        load_settings(env={name: value}, home=tmp_path)
    in_range = {name: "0"} if "WINDOW" not in name else {name: "1"}
    assert getattr(
        load_settings(env=in_range, home=tmp_path), name[len("VALUELOOP_") :].lower()
    ) == float(in_range[name])


def test_the_cli_refuses_a_percentage_for_a_share(tmp_path: Path) -> None:
    result = run_valueloop(
        "campaign", "plan", home=tmp_path, env={"VALUELOOP_CAMPAIGN_CONTROL_SHARE": "10"}
    )
    assert result.returncode == 1
    assert "error: VALUELOOP_CAMPAIGN_CONTROL_SHARE=10 is outside [0, 1)" in result.stderr
