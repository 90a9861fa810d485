"""The summary `valueloop run` ends with: what was loaded and checked, which model won, where
the BI tables are, and the exact commands that open the UIs.

Everything is read back from the platform's own stores (the warehouse, read-only, and the
MLflow registry), so the summary shows what a person will find there, not what a step said.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb
from rich.console import Console
from rich.table import Table

from valueloop import bi_snapshot
from valueloop.config import REPO_ROOT, Settings

METRICS = (
    ("customer_score", "score"),
    ("churn_roc_auc", "churn AUC"),
    ("churn_brier", "Brier"),
    ("tier_macro_f1", "tier F1"),
    ("top_decile_revenue_capture", "top-10% capture"),
)
BI_TABLES = ("marts.customer_scores", "marts.segment_summary", "marts.bi_action_plan")


@dataclass(frozen=True)
class Loaded:
    entity: str
    batches: int
    new_batches: int
    rows_read: int
    rows_accepted: int
    rows_quarantined: int


@dataclass(frozen=True)
class Checked:
    checkpoint: str
    run_id: str
    passed: int
    warnings: int
    critical: int


@dataclass(frozen=True)
class Champion:
    version: str
    model: str
    decision: str
    reason: str
    challenger: str = "transformer"  # or "stack": the candidate the gate judged


@dataclass(frozen=True)
class RunSummary:
    loaded: list[Loaded]
    checked: list[Checked]
    models: dict[str, dict[str, float]]
    champion: Champion | None
    tiers: dict[str, int]
    report: Path | None


def _warehouse_facts(settings: Settings, since: datetime) -> tuple[list, list, dict]:
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        loaded = [
            Loaded(*row)
            for row in con.execute(
                """
                select entity, count(*), count(*) filter (where loaded_at >= ?),
                       sum(rows_read), sum(rows_accepted), sum(rows_quarantined)
                from raw.ingest_batches group by entity order by entity
                """,
                [since.replace(tzinfo=None)],
            ).fetchall()
        ]
        checked = [
            Checked(*row)
            for row in con.execute(
                """
                with latest as (
                    select checkpoint, arg_max(run_id, validated_at) as run_id
                    from quality.validation_results group by checkpoint
                )
                select checkpoint, run_id,
                       count(*) filter (where success),
                       count(*) filter (where not success and severity = 'warning'),
                       count(*) filter (where not success and severity = 'critical')
                from quality.validation_results join latest using (checkpoint, run_id)
                group by all order by min(validated_at)
                """
            ).fetchall()
        ]
        tiers = dict(
            con.execute(
                "select value_tier, count(*) from marts.customer_scores group by 1 order by 1"
            ).fetchall()
        )
    return loaded, checked, tiers


def _model_facts(settings: Settings) -> tuple[dict[str, dict[str, float]], Champion | None]:
    from mlflow.tracking import MlflowClient

    from ml.config import TrainConfig

    config = TrainConfig.load(settings.train_config)
    client = MlflowClient(settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is None:
        return {}, None
    parents = client.search_runs(
        [experiment.experiment_id],
        "tags.`valueloop.kind` = 'training'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    models: dict[str, dict[str, float]] = {}
    decision = reason = ""
    challenger = "transformer"
    if parents:
        children = client.search_runs(
            [experiment.experiment_id],
            f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'",
        )
        for child in sorted(children, key=lambda r: r.info.start_time):
            name = child.data.tags.get("valueloop.model", child.info.run_name)
            if child.data.tags.get("valueloop.kind") == "fallback-champion":
                continue
            models[name] = {
                key: child.data.metrics[f"test_{key}"]
                for key, _ in METRICS
                if f"test_{key}" in child.data.metrics
            }
            decision = child.data.tags.get("gate.decision", decision)
            reason = child.data.tags.get("gate.reason", reason)
            challenger = child.data.tags.get("valueloop.challenger", challenger)
    aliases = client.get_registered_model(config.registered_model).aliases
    if "champion" not in aliases:
        return models, None
    version = client.get_model_version(config.registered_model, aliases["champion"])
    model = client.get_run(version.run_id).data.tags.get("valueloop.model", "?")
    return models, Champion(str(version.version), model, decision, reason, challenger)


def collect(settings: Settings, since: datetime) -> RunSummary:
    loaded, checked, tiers = _warehouse_facts(settings, since)
    models, champion = _model_facts(settings)
    reports = sorted(
        (
            p
            for p in (settings.home / "reports").glob("scoring_*.html")
            if not p.stem.endswith("_monitoring")
        ),
        key=lambda p: p.stat().st_mtime,
    )
    return RunSummary(loaded, checked, models, champion, tiers, reports[-1] if reports else None)


def _shown(path: Path) -> str:
    """Paths under the repository read shorter relative to it."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _make(settings: Settings, target: str) -> str:
    default_home = (REPO_ROOT / "data").resolve()
    prefix = "" if settings.home == default_home else f"VALUELOOP_HOME={settings.home} "
    return f"{prefix}make {target}"


def _models_table(summary: RunSummary) -> Table:
    table = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
    table.add_column("model")
    for _, label in METRICS:
        table.add_column(label, justify="right")
    champion = summary.champion.model if summary.champion else None
    for name, metrics in summary.models.items():
        label = f"[bold green]{name} ★[/]" if name == champion else name
        table.add_row(label, *(f"{metrics[k]:.3f}" if k in metrics else "–" for k, _ in METRICS))
    return table


def render(console: Console, summary: RunSummary, settings: Settings, logs: Path) -> None:
    from valueloop.orchestration import ADMIN_USER, admin_password

    def print_(*objects, **kwargs) -> None:  # long lines wrap in the terminal, not here
        console.print(*objects, soft_wrap=True, **kwargs)

    print_()
    print_("[bold]Summary[/]")
    read = sum(x.rows_read for x in summary.loaded)
    quarantined = sum(x.rows_quarantined for x in summary.loaded)
    new = sum(x.new_batches for x in summary.loaded)
    print_(
        f"  [bold]data[/]     {read:,} rows read, {read - quarantined:,} accepted, "
        f"{quarantined:,} quarantined ({new} new batch(es) this run; "
        + ", ".join(f"{x.entity} {x.rows_accepted:,}" for x in summary.loaded)
        + ")"
    )
    if quarantined:
        print_("           why: select * from raw.quarantine")
    checks = ", ".join(
        f"{c.checkpoint} {c.passed}/{c.passed + c.warnings + c.critical} passed"
        + (f" ({c.warnings} warning(s))" if c.warnings else "")
        + (f" [red]({c.critical} critical)[/]" if c.critical else "")
        for c in summary.checked
    )
    print_(f"  [bold]checks[/]   {checks}   (quality.validation_results)")
    if summary.champion:
        champ = summary.champion
        print_(
            f"  [bold]model[/]    champion: {champ.model} (v{champ.version}); "
            f"{champ.challenger} {champ.decision or 'not gated'}: {champ.reason}"
        )
    else:
        print_("  [bold]model[/]    no champion yet")
    if summary.models:
        refused = summary.champion is not None and summary.champion.decision == "refused"
        print_(
            "           the latest training, on its frozen holdout (refused; ★ the champion's"
            " kind of model):"
            if refused
            else "           on the frozen holdout (★ champion):"
        )
        console.print(_models_table(summary))
    tiers = " · ".join(f"{tier} {n:,}" for tier, n in summary.tiers.items())
    print_(
        f"  [bold]BI[/]       {sum(summary.tiers.values()):,} customers scored ({tiers}) in "
        f"{', '.join(BI_TABLES)}"
    )
    bi = bi_snapshot.current_database(settings.exports_dir)
    print_(f"           BI tools open {_shown(bi)} (a snapshot: never blocks the pipeline)")
    if summary.report:
        print_(f"           report {_shown(summary.report)}")
        monitoring = summary.report.with_name(summary.report.stem + "_monitoring.html")
        if monitoring.exists():
            print_(f"           drift and migration {_shown(monitoring)}")
    query = (
        f"import duckdb; duckdb.connect('{_shown(bi)}', read_only=True)"
        ".sql('select * from marts.customer_scores limit 5').show()"
    )
    print_(f'           {_shown(Path(sys.executable))} -c "{query}"')
    print_(
        f"  [bold]open[/]     Airflow UI: {_make(settings, 'airflow')}    → http://localhost:8080"
        f"  (login {ADMIN_USER} / {admin_password(settings)})"
    )
    print_(
        f"           MLflow UI:  {_make(settings, 'mlflow-ui')}  → http://127.0.0.1:5000"
        "  (experiment valueloop; Models → valueloop-customer-model)"
    )
    print_(f"  [bold]logs[/]     {_shown(logs)}/")


def render_loop(console: Console, cycles: list) -> None:
    """What the loop measured, cycle by cycle (valueloop/loop.py CycleResult)."""
    if not cycles:
        return
    console.print(
        "  [bold]loop[/]     treated vs randomised control, per action (95% interval):",
        soft_wrap=True,
    )
    for result in cycles:
        for line in result.lines():
            console.print(f"           {line}", soft_wrap=True, highlight=False)
    console.print(
        "           per segment and tier: select * from marts.campaign_performance;"
        " drift: select * from monitoring.feature_drift",
        soft_wrap=True,
    )
