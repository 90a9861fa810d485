"""The one home of ValueLoop's configuration.

Every path lives under a home folder (default ``./data``, overridden by ``VALUELOOP_HOME``) and
every setting can be overridden by its own environment variable. Nothing is read or created at
import time: call :func:`load_settings` where the settings are needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import date
from pathlib import Path

ENV_PREFIX = "VALUELOOP_"
DEFAULT_HOME = Path("data")


@dataclass(frozen=True)
class Settings:
    """Typed settings; build them with :func:`load_settings`."""

    home: Path
    warehouse_path: Path
    mlflow_tracking_uri: str
    mlflow_artifacts_dir: Path
    airflow_home: Path
    landing_dir: Path
    quarantine_dir: Path
    demo_dir: Path
    pii_salt: str
    shop_opened_on: date
    demo_customers: int
    demo_seed: int

    def ensure_dirs(self) -> None:
        """Create the folders the platform writes to (called by commands, never on import)."""
        for path in (
            self.home,
            self.warehouse_path.parent,
            self.mlflow_artifacts_dir,
            self.airflow_home,
            self.landing_dir,
            self.quarantine_dir,
        ):
            path.mkdir(parents=True, exist_ok=True)

    def as_env(self) -> dict[str, str]:
        """The settings as environment variables, for subprocesses (dbt, Airflow)."""
        return {_env_name(f.name): str(getattr(self, f.name)) for f in fields(self)}


def _env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def load_settings(env: Mapping[str, str] | None = None, home: str | Path | None = None) -> Settings:
    """Build settings from defaults, then the environment, then explicit arguments."""
    env = os.environ if env is None else env
    home_path = Path(home or env.get(_env_name("home")) or DEFAULT_HOME).resolve()

    def path(name: str, default: Path) -> Path:
        value = env.get(_env_name(name))
        return Path(value).resolve() if value else default

    warehouse = path("warehouse_path", home_path / "warehouse.duckdb")
    mlflow_db = home_path / "mlflow.db"
    return Settings(
        home=home_path,
        warehouse_path=warehouse,
        mlflow_tracking_uri=env.get(_env_name("mlflow_tracking_uri"), f"sqlite:///{mlflow_db}"),
        mlflow_artifacts_dir=path("mlflow_artifacts_dir", home_path / "mlartifacts"),
        airflow_home=path("airflow_home", home_path / "airflow"),
        landing_dir=path("landing_dir", home_path / "landing"),
        quarantine_dir=path("quarantine_dir", home_path / "quarantine"),
        demo_dir=path("demo_dir", home_path / "demo_shop"),
        # The salt is a secret of the deployment: the default only keeps a fresh machine
        # working and is announced as such by `valueloop run`.
        pii_salt=env.get(_env_name("pii_salt"), "valueloop-demo-salt-change-me"),
        shop_opened_on=date.fromisoformat(env.get(_env_name("shop_opened_on"), "2009-01-01")),
        demo_customers=int(env.get(_env_name("demo_customers"), "10000")),
        demo_seed=int(env.get(_env_name("demo_seed"), "42")),
    )
