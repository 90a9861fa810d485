"""Monitoring tables for BI, written by every scoring run (schema ``monitoring``).

* ``feature_drift``: per feature, the population stability index (PSI) of the scored
  customers against the champion's training data (deciles of it, logged with the model at
  training: ``drift_reference.json``; PSI < 0.1 stable, 0.1-0.25 moving, > 0.25 drifted);
* ``score_drift``: PSI of churn probability and P(high) against the previous scoring run;
* ``tier_migration``: customers per (previous tier, current tier) between the two runs (``new``:
  not scored before; ``gone``: scored before, not now);
* ``champion_performance``: for earlier scoring runs whose horizon has since passed, how the
  scores did against what happened (churn ROC-AUC, tier accuracy), per model version.

A run's rows are replaced when it is re-run. An HTML page of the same is logged to MLflow with
the scoring run. (evidently 0.7.23 does not import under pandas 3, and no nannyml release
resolves with this lock, so the measures are computed here, in DuckDB and numpy.)
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

# Behaviour, not age: tenure grows by construction between the reference and today, so it
# would always read as drift.
DRIFT_FEATURES = (
    "recency_days",
    "frequency",
    "monetary_value",
    "avg_order_value",
    "orders_last_90d",
    "spend_last_90d",
    "return_rate",
    "discounted_line_share",
    "n_distinct_products",
    "avg_rating",
)
STABLE, DRIFTED = 0.1, 0.25
REFERENCE_ARTIFACT = "drift_reference.json"  # logged with each training run
DDL = {
    "feature_drift": "scoring_run_id varchar, computed_at timestamp, feature varchar,"
    " psi double, reference_mean double, current_mean double, status varchar,"
    " reference varchar",
    "score_drift": "scoring_run_id varchar, previous_run_id varchar, computed_at timestamp,"
    " score varchar, psi double, current_mean double, previous_mean double, status varchar",
    "tier_migration": "scoring_run_id varchar, previous_run_id varchar, from_tier varchar,"
    " to_tier varchar, customers bigint",
    "champion_performance": "scoring_run_id varchar, scored_run_id varchar,"
    " model_version varchar, as_of date, customers bigint, churn_rate double,"
    " churn_roc_auc double, lapsed_accuracy double",
}


def profile(values: np.ndarray, bins: int = 10) -> dict | None:
    """A reference population as PSI needs it: its quantile bin edges, the share of it in each
    bin, and its mean (None when it has no finite value)."""
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return {
        "edges": edges.tolist(),
        "shares": (counts / counts.sum()).tolist(),
        "mean": float(values.mean()),
    }


def reference_profiles(frame: pd.DataFrame) -> dict[str, dict]:
    """Per drift feature, the :func:`profile` of what a model is trained on. Training logs it
    with the model's run (``drift_reference.json``), so that scoring measures drift against the
    champion's own training data, not against marts that have moved on since."""
    out = {}
    for feature in DRIFT_FEATURES:
        if feature in frame:
            found = profile(frame[feature].to_numpy(float))
            if found is not None:
                out[feature] = found
    return out


def psi_against(reference: dict | None, current: np.ndarray) -> float:
    """Population stability index of ``current`` over a reference :func:`profile`'s bins."""
    current = current[np.isfinite(current)]
    if reference is None or len(current) == 0:
        return float("nan")
    edges = np.asarray(reference["edges"], dtype=float)
    cur = np.bincount(np.searchsorted(edges, current, side="right"), minlength=len(edges) + 1)
    r = np.clip(np.asarray(reference["shares"], dtype=float), 1e-4, None)
    c = np.clip(cur / cur.sum(), 1e-4, None)
    return float(((c - r) * np.log(c / r)).sum())


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index over the reference's quantile bins."""
    return psi_against(profile(reference, bins), current)


def _status(value: float) -> str:
    if not np.isfinite(value):
        return "n/a"
    return "stable" if value < STABLE else "moving" if value < DRIFTED else "drifted"


def _first_measured(con: duckdb.DuckDBPyConnection, run_id: str) -> datetime | None:
    try:
        return con.execute(
            "select min(computed_at) from monitoring.feature_drift where scoring_run_id = ?",
            [run_id],
        ).fetchone()[0]
    except duckdb.CatalogException:  # the first monitored run
        return None


def record(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    horizon_days: int,
    reference: dict[str, dict] | None = None,
    reference_name: str | None = None,
) -> dict[str, pd.DataFrame]:
    """Compute and store the four tables for scoring run ``run_id`` (already published).

    Feature drift is measured against ``reference`` (:func:`reference_profiles` of the
    champion's training data, named ``reference_name``); a champion trained before it was
    logged is measured against the training split of today's marts instead, and the table's
    ``reference`` column says which."""
    # A rerun of the same scoring run keeps when it was first measured: the retraining
    # trigger reads drift measured since the last training, and a rerun measures no new data.
    now = _first_measured(con, run_id) or datetime.now(UTC).replace(tzinfo=None)
    features = ", ".join(DRIFT_FEATURES)
    if reference is None:
        reference = reference_profiles(
            con.execute(f"select {features} from marts.training_set where split = 'train'").df()
        )
        reference_name = "marts.training_set (today's; the champion logged no reference)"
    current = con.execute(f"select {features} from marts.scoring_set").df()
    feature_drift = pd.DataFrame(
        [
            {
                "scoring_run_id": run_id,
                "computed_at": now,
                "feature": f,
                "psi": psi_against(reference.get(f), current[f].to_numpy(float)),
                "reference_mean": reference[f]["mean"] if f in reference else float("nan"),
                "current_mean": float(current[f].mean()),
                "reference": reference_name,
            }
            for f in DRIFT_FEATURES
        ]
    )
    feature_drift["status"] = feature_drift["psi"].map(_status)

    runs = con.execute(
        "select scoring_run_id, max(scored_at) as last_at from marts.customer_scores_history"
        " group by 1 order by last_at"
    ).fetchall()
    # The run scored last before this one (a rerun of an earlier run keeps its time: it is
    # not compared with the runs that came after it).
    at = dict(runs).get(run_id)
    previous = [r[0] for r in runs if r[0] != run_id and (at is None or r[1] < at)]
    previous_run = previous[-1] if previous else None
    score_rows, migration = (
        [],
        pd.DataFrame(
            columns=["scoring_run_id", "previous_run_id", "from_tier", "to_tier", "customers"]
        ),
    )
    if previous_run:
        both = con.execute(
            "select now.customer_id, now.churn_probability, now.p_high, now.value_tier,"
            " before.churn_probability as churn_before, before.p_high as p_high_before,"
            " before.value_tier as tier_before"
            " from (select * from marts.customer_scores_history where scoring_run_id = ?) as now"
            " full join (select * from marts.customer_scores_history where scoring_run_id = ?)"
            " as before using (customer_id)",
            [run_id, previous_run],
        ).df()
        for metric, before in (("churn_probability", "churn_before"), ("p_high", "p_high_before")):
            value = psi(both[before].to_numpy(float), both[metric].to_numpy(float))
            score_rows.append(
                {
                    "scoring_run_id": run_id,
                    "previous_run_id": previous_run,
                    "computed_at": now,
                    "score": metric,
                    "psi": value,
                    "current_mean": float(both[metric].mean()),
                    "previous_mean": float(both[before].mean()),
                    "status": _status(value),
                }
            )
        migration = (
            both.assign(
                from_tier=both["tier_before"].fillna("new"),
                to_tier=both["value_tier"].fillna("gone"),
            )
            .groupby(["from_tier", "to_tier"], as_index=False)
            .size()
            .rename(columns={"size": "customers"})
            .assign(scoring_run_id=run_id, previous_run_id=previous_run)
        )[["scoring_run_id", "previous_run_id", "from_tier", "to_tier", "customers"]]
    score_drift = pd.DataFrame(
        score_rows,
        columns=[
            "scoring_run_id",
            "previous_run_id",
            "computed_at",
            "score",
            "psi",
            "current_mean",
            "previous_mean",
            "status",
        ],
    )

    realised = con.execute(
        f"""
        with last_day as (
            select max(ordered_on) as day from intermediate.int_order_lines_enriched
        ),
        matured as (
            select history.*
            from marts.customer_scores_history as history, last_day
            where history.as_of + to_days({horizon_days}) <= last_day.day
        ),
        bought as (
            select matured.scoring_run_id, matured.customer_id,
                count(*) filter (where lines.is_purchase) as orders
            from matured
            inner join intermediate.int_order_lines_enriched as lines
                on lines.customer_id = matured.customer_id
                and lines.ordered_on > matured.as_of
                and lines.ordered_on <= matured.as_of + to_days({horizon_days})
                and lines.is_merchandise
            group by all
        )
        select matured.scoring_run_id, matured.model_version, matured.as_of,
            matured.churn_probability, matured.value_tier,
            coalesce(bought.orders, 0) = 0 as churned
        from matured
        left join bought using (scoring_run_id, customer_id)
        """
    ).df()
    perf = []
    for (scored_run, version, as_of), group in realised.groupby(
        ["scoring_run_id", "model_version", "as_of"]
    ):
        churned = group["churned"].to_numpy(bool)
        auc = (
            float(roc_auc_score(churned, group["churn_probability"]))
            if 0 < churned.sum() < len(churned)
            else float("nan")
        )
        perf.append(
            {
                "scoring_run_id": run_id,
                "scored_run_id": scored_run,
                "model_version": version,
                "as_of": as_of,
                "customers": len(group),
                "churn_rate": float(churned.mean()),
                "churn_roc_auc": auc,
                "lapsed_accuracy": float(((group["value_tier"] == "lapsed") == churned).mean()),
            }
        )
    champion_performance = pd.DataFrame(
        perf,
        columns=[
            "scoring_run_id",
            "scored_run_id",
            "model_version",
            "as_of",
            "customers",
            "churn_rate",
            "churn_roc_auc",
            "lapsed_accuracy",
        ],
    )
    tables = {
        "feature_drift": feature_drift,
        "score_drift": score_drift,
        "tier_migration": migration,
        "champion_performance": champion_performance,
    }
    con.execute("create schema if not exists monitoring")
    for name, frame in tables.items():
        con.register("_frame", frame)
        con.execute(f"create table if not exists monitoring.{name} ({DDL[name]})")
        for column in DDL[name].split(","):  # a table from an earlier release gains new columns
            con.execute(f"alter table monitoring.{name} add column if not exists {column}")
        con.execute(f"delete from monitoring.{name} where scoring_run_id = ?", [run_id])
        con.execute(f"insert into monitoring.{name} by name select * from _frame")
        con.unregister("_frame")
    return tables


def write_html(tables: dict[str, pd.DataFrame], run_id: str, path: Path) -> Path:
    parts = [
        f"<html><head><meta charset='utf-8'><title>Monitoring {html.escape(run_id)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>",
        f"<h1>Monitoring of scoring run {html.escape(run_id)}</h1>",
        f"<p>PSI below {STABLE}: stable; {STABLE}-{DRIFTED}: moving; above {DRIFTED}: drifted.</p>",
    ]
    for name, frame in tables.items():
        parts.append(f"<h2>{name.replace('_', ' ')}</h2>")
        parts.append(
            frame.drop(columns=["scoring_run_id"], errors="ignore").to_html(
                index=False, float_format=lambda v: f"{v:.4f}", na_rep="n/a"
            )
            if len(frame)
            else "<p>nothing yet (needs an earlier scoring run or labels that have arrived)</p>"
        )
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path
