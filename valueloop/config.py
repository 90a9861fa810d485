"""The one home of ValueLoop's configuration.

Every path lives under a home folder (default ``./data``, overridden by ``VALUELOOP_HOME``) and
every setting can be overridden by its own environment variable. Nothing is read or created at
import time: call :func:`load_settings` where the settings are needed.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import date
from pathlib import Path

ENV_PREFIX = "VALUELOOP_"
DEFAULT_HOME = Path("data")
REPO_ROOT = Path(__file__).resolve().parents[1]


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
    dbt_project_dir: Path
    dbt_target_dir: Path
    gx_project_dir: Path
    dbt_executable: Path
    train_config: Path | None
    pii_salt: str | None
    # Plausible ranges (valueloop/plausibility.py): rows outside are quarantined at ingest.
    shop_opened_on: date  # the earliest plausible date of an invoice, signup or review
    plausible_future_days: int  # how far past load time a date may lie (clocks, time zones)
    plausible_quantity_max: int  # |quantity| of an order line
    plausible_price_max: int  # |unit price| of an order line, list price of a product
    implausible_share_max: float  # share of a batch quarantined as implausible that still passes
    demo_customers: int
    demo_seed: int
    # DuckDB's memory cap for dbt builds (it spills to disk beyond it): a DuckDB size string.
    duckdb_memory_limit: str
    # How long a BI snapshot stays readable after it stopped being current (bi_snapshot.py).
    bi_snapshot_retention_hours: float
    # The Celery queue of the training task: `gpu` sends it to the compose file's GPU trainer.
    train_queue: str
    # The loop (valueloop/campaigns.py, ml/uplift.py, valueloop/retraining.py).
    campaign_control_share: float  # share of each action's customers held out as control
    campaign_exploration_share: float  # share given a random eligible action (to learn from)
    campaign_budget: float  # most a campaign may spend on contacts, in the shop's currency
    campaign_window_days: int  # days after assignment in which outcomes count
    margin_rate: float  # gross margin on revenue: incremental profit = margin x revenue - cost
    # What losing a customer's consent costs, in the shop's currency: an unsubscribed customer
    # leaves every later campaign. The policy charges it per expected unsubscribe.
    unsubscribe_cost: float
    uplift_min_outcomes: int  # randomised outcomes needed before uplift replaces the playbook
    uplift_confidence_z: float  # uplift departs from the playbook only on a gain > z std errors
    uplift_gate_bootstrap: int  # resamples of the uplift gate's paired test (0: point estimate)
    # What the uplift gate asks of a challenger's policy (ml/uplift.py): "guardrail" (no loss
    # beyond the noise) or "superiority" (a gain beyond the noise)
    uplift_gate: str
    retrain_min_outcomes: int  # new campaign outcomes (customers) that trigger retraining
    retrain_min_corrections: int  # new label corrections that trigger retraining
    retrain_drift_psi: float  # feature or score PSI that triggers retraining
    retrain_every_days: int  # retrain at least this often
    # Reason codes per scored customer (ml/reasons.py): exact TreeSHAP, the costliest part of
    # scoring a LightGBM champion; off for very large scoring runs.
    score_reasons: bool
    # Off: the DAGs run only when triggered (UI, REST API) or when their assets update; their
    # time schedules create no runs. `valueloop stack run` turns them off for its one run.
    schedules: bool

    @property
    def logs_dir(self) -> Path:
        """Tool output (pip, Airflow, dbt, Lightning) that `valueloop run` keeps off the screen."""
        return self.home / "logs"

    @property
    def exports_dir(self) -> Path:
        """BI snapshots (valueloop/bi_snapshot.py): what BI tools read instead of the warehouse."""
        return self.home / "exports"

    @property
    def training_dir(self) -> Path:
        """Training-data snapshots, one folder per run (the train task reads these)."""
        return self.home / "training"

    @property
    def campaigns_dir(self) -> Path:
        """Campaign files for the activation tool, one CSV and one Parquet per campaign."""
        return self.exports_dir / "campaigns"

    @property
    def feedback_dir(self) -> Path:
        """Where outcome and label files land (campaign_outcomes/, label_feedback/)."""
        return self.landing_dir / "feedback"

    @property
    def stack_dir(self) -> Path:
        """The native production stack's Airflow home, MLflow artifacts and service logs."""
        return self.home / "stack"

    def __post_init__(self) -> None:
        """A share or a rate out of its range says what was meant (10 for 10%?) before a
        campaign is planned with it: every customer a control, say, and nothing exported."""
        bounds = {
            "campaign_control_share": (0.0, 1.0, False),  # (low, high, high allowed)
            "campaign_exploration_share": (0.0, 1.0, True),
            "margin_rate": (0.0, 1.0, True),
            "implausible_share_max": (0.0, 1.0, True),
        }
        for name, (low, high, high_ok) in bounds.items():
            value = getattr(self, name)
            if not (low <= value < high or (high_ok and value == high)):
                interval = f"[{low:g}, {high:g}{']' if high_ok else ')'}"
                raise ValueError(
                    f"{_env_name(name)}={value:g} is outside {interval}: a share, not a"
                    f" percentage (0.1 for 10%)"
                )
        for name in ("campaign_budget", "unsubscribe_cost"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_env_name(name)}={getattr(self, name):g} is negative")
        if self.campaign_window_days < 1:
            raise ValueError(
                f"{_env_name('campaign_window_days')}={self.campaign_window_days} is under a day"
            )

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
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {_env_name(k): str(v) for k, v in values.items() if v is not None}

    def resolve_pii_salt(self) -> str:
        """The pseudonymisation secret: the configured one, else one made for this home.

        The salt never comes from the repository: without ``VALUELOOP_PII_SALT`` a random one
        is created once in ``$VALUELOOP_HOME/.pii_salt`` and reused, so hashes stay stable.
        """
        if self.pii_salt:
            return self.pii_salt
        salt_file = self.home / ".pii_salt"
        if not salt_file.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            salt_file.write_text(secrets.token_hex(32))
            salt_file.chmod(0o600)
        return salt_file.read_text().strip()


def path_safe(run_id: str) -> str:
    """A run id (Airflow's hold ':' and '+') as a file or folder name."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in run_id)


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def env_var(setting: str) -> str:
    """The environment variable that overrides a setting, e.g. ``VALUELOOP_SHOP_OPENED_ON``."""
    if setting not in {f.name for f in fields(Settings)}:
        raise KeyError(f"no setting named {setting!r}")
    return _env_name(setting)


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
        demo_dir=path("demo_dir", home_path / "landing" / "simulator" / "demo_shop"),
        dbt_project_dir=path("dbt_project_dir", REPO_ROOT / "dbt_project"),
        dbt_target_dir=path("dbt_target_dir", home_path / "dbt" / "target"),
        gx_project_dir=path("gx_project_dir", REPO_ROOT / "expectations"),
        dbt_executable=path("dbt_executable", Path(sys.executable).with_name("dbt")),
        train_config=path("train_config", None) if env.get(_env_name("train_config")) else None,
        pii_salt=env.get(_env_name("pii_salt")) or None,
        shop_opened_on=date.fromisoformat(env.get(_env_name("shop_opened_on"), "1990-01-01")),
        plausible_future_days=int(env.get(_env_name("plausible_future_days"), "1")),
        plausible_quantity_max=int(env.get(_env_name("plausible_quantity_max"), "100000")),
        plausible_price_max=int(env.get(_env_name("plausible_price_max"), "100000")),
        implausible_share_max=float(env.get(_env_name("implausible_share_max"), "0.01")),
        demo_customers=int(env.get(_env_name("demo_customers"), "10000")),
        demo_seed=int(env.get(_env_name("demo_seed"), "42")),
        duckdb_memory_limit=env.get(_env_name("duckdb_memory_limit"), "4GB"),
        train_queue=env.get(_env_name("train_queue"), "default"),
        bi_snapshot_retention_hours=float(env.get(_env_name("bi_snapshot_retention_hours"), "24")),
        campaign_control_share=float(env.get(_env_name("campaign_control_share"), "0.1")),
        campaign_exploration_share=float(env.get(_env_name("campaign_exploration_share"), "0.2")),
        campaign_budget=float(env.get(_env_name("campaign_budget"), "10000")),
        campaign_window_days=int(env.get(_env_name("campaign_window_days"), "30")),
        margin_rate=float(env.get(_env_name("margin_rate"), "0.35")),
        unsubscribe_cost=float(env.get(_env_name("unsubscribe_cost"), "1.0")),
        uplift_min_outcomes=int(env.get(_env_name("uplift_min_outcomes"), "2000")),
        uplift_confidence_z=float(env.get(_env_name("uplift_confidence_z"), "1.64")),
        uplift_gate_bootstrap=int(env.get(_env_name("uplift_gate_bootstrap"), "200")),
        uplift_gate=env.get(_env_name("uplift_gate"), "guardrail"),
        retrain_min_outcomes=int(env.get(_env_name("retrain_min_outcomes"), "1000")),
        retrain_min_corrections=int(env.get(_env_name("retrain_min_corrections"), "50")),
        retrain_drift_psi=float(env.get(_env_name("retrain_drift_psi"), "0.25")),
        retrain_every_days=int(env.get(_env_name("retrain_every_days"), "7")),
        score_reasons=_flag(env.get(_env_name("score_reasons"), "true")),
        schedules=_flag(env.get(_env_name("schedules"), "true")),
    )
