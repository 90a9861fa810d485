"""Monitoring tables for BI, written by every scoring run (schema ``monitoring``).

* ``feature_drift``: per feature, the population stability index (PSI) of the scored
  customers against the champion's training data (deciles of it, logged with the model at
  training: ``drift_reference.json``; PSI < 0.1 stable, 0.1-0.25 moving, > 0.25 drifted);
* ``score_drift``: PSI of churn probability and P(high) against the previous scoring run;
* ``tier_migration``: customers per (previous tier, current tier) between the two runs (``new``:
  not scored before; ``gone``: scored before, not now);
* ``champion_performance``: for earlier scoring runs whose horizon has since passed (one per
  day and model version), how the scores did against what happened as the labels count it,
  corrections included (churn ROC-AUC, lapsed accuracy; also without the customers a campaign
  treated), measured afresh by every run.

PSI bins: the reference's deciles, a pile-up on one value a bin of its own, missing values one
more (:func:`profile`). A run's rows are replaced when it is re-run, all four tables in one
transaction. An HTML page of the same is logged to MLflow with
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
    " churn_roc_auc double, lapsed_accuracy double, corrected_labels bigint,"
    " untreated_customers bigint, untreated_churn_roc_auc double",
}
PERFORMANCE = DDL["champion_performance"].split(", ")


# An edge holding at least this share of the reference exactly is a bin of its own (a pile-up:
# zero returns, one order). Below it an edge is a data point the deciles happened to land on,
# which a new sample almost never hits again: as its own bin it would read as drift.
POINT_SHARE = 0.05


def _bins(edges: np.ndarray, points: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each value's bin among ``2 x len(edges) + 1``: the gaps between the edges, right-open
    (``len(edges) + 1``), then one per edge for the edges that are ``points``, where the
    data piles up on one value: a pile shares no bin with its neighbours, so a move off it
    or onto it is seen (a pile at zero with small positive values beside it, or at the top)."""
    k = len(edges)
    if k == 0:  # a reference with no value present: one bin
        return np.zeros(len(values), dtype=int)
    gap = np.searchsorted(edges, values, side="right")
    below = np.searchsorted(edges, values, side="left")
    edge = np.minimum(below, k - 1)
    at = (below < k) & (edges[edge] == values) & points[edge]
    return np.where(at, k + 1 + edge, gap)


def profile(values: np.ndarray, bins: int = 10) -> dict | None:
    """A reference population as PSI needs it: its quantile bin edges, which of them are
    piles of their own (:func:`_bins`), the share of it in each bin and the share missing
    (null or not finite), of all its values, and its mean (None when no value is there; the
    profile is None for no values at all)."""
    total = len(values)
    if total == 0:
        return None
    finite = values[np.isfinite(values)]
    edges = (
        np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1]))
        if len(finite)
        else np.array([], dtype=float)
    )
    points = np.array([(finite == e).mean() >= POINT_SHARE for e in edges], dtype=bool)
    counts = np.bincount(_bins(edges, points, finite), minlength=2 * len(edges) + 1)
    return {
        "edges": edges.tolist(),
        "points": points.tolist(),
        "shares": (counts / total).tolist(),
        "missing": (total - len(finite)) / total,
        "mean": float(finite.mean()) if len(finite) else None,
        "bins": "piles apart",
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
    """Population stability index of ``current`` over a reference :func:`profile`'s bins, the
    missing values a bin of their own: a feed that stops filling a feature is drift. A
    reference logged before 2026-11-28 (no ``bins``) has right-open bins over its values
    present, and is read as it was made: missing values left out."""
    if reference is None or len(current) == 0:
        return float("nan")
    edges = np.asarray(reference["edges"], dtype=float)
    shares = np.asarray(reference["shares"], dtype=float)
    finite = current[np.isfinite(current)]
    if "bins" in reference:
        points = np.asarray(reference.get("points", [True] * len(edges)), dtype=bool)
        cur = np.bincount(_bins(edges, points, finite), minlength=2 * len(edges) + 1)
        cur = cur / len(current)
        cur = np.append(cur, 1 - len(finite) / len(current))
        shares = np.append(shares, reference["missing"])
    else:
        if len(finite) == 0:
            return float("nan")
        cur = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=len(edges) + 1)
        cur = cur / cur.sum()
    r, c = np.clip(shares, 1e-4, None), np.clip(cur, 1e-4, None)
    return float(((c - r) * np.log(c / r)).sum())


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index over the reference's quantile bins."""
    return psi_against(profile(reference, bins), current)


def _status(value: float) -> str:
    if not np.isfinite(value):
        return "n/a"
    return "stable" if value < STABLE else "moving" if value < DRIFTED else "drifted"


def _exists(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    return bool(
        con.execute(
            "select count(*) from information_schema.tables"
            " where table_schema = ? and table_name = ?",
            [schema, table],
        ).fetchone()[0]
    )


def _first_measured(con: duckdb.DuckDBPyConnection, run_id: str) -> datetime | None:
    if not _exists(con, "monitoring", "feature_drift"):  # the first monitored run
        return None
    return con.execute(
        "select min(computed_at) from monitoring.feature_drift where scoring_run_id = ?",
        [run_id],
    ).fetchone()[0]


def feature_drift(
    con: duckdb.DuckDBPyConnection,
    reference: dict[str, dict] | None,
    reference_name: str | None,
) -> pd.DataFrame:
    """Per drift feature, the PSI of the customers in ``marts.scoring_set`` against
    ``reference`` (:func:`reference_profiles` of the champion's training data, named
    ``reference_name``); a champion trained before it was logged is measured against the
    training split of today's marts instead, and the ``reference`` column says which. Scoring
    measures it when it reads the scoring set (``ml.score``), so that what is published
    describes the customers that were scored even if the marts move on before publishing."""
    features = ", ".join(DRIFT_FEATURES)
    if reference is None:
        reference = reference_profiles(
            con.execute(f"select {features} from marts.training_set where split = 'train'").df()
        )
        reference_name = "marts.training_set (today's; the champion logged no reference)"
    current = con.execute(f"select {features} from marts.scoring_set").df()
    found = pd.DataFrame(
        [
            {
                "feature": f,
                "psi": psi_against(reference.get(f), current[f].to_numpy(float)),
                "reference_mean": float("nan")
                if reference.get(f, {}).get("mean") is None
                else reference[f]["mean"],
                "current_mean": float(current[f].mean()),
                "reference": reference_name,
            }
            for f in DRIFT_FEATURES
        ]
    )
    return found.assign(status=found["psi"].map(_status))


def _performance(con: duckdb.DuckDBPyConnection, horizon_days: int) -> pd.DataFrame:
    """Per earlier scoring run whose horizon has passed, its scores and what happened: churned
    (no order in the horizon, as the labels count it), unless a correction from people
    (``marts.label_corrections``, what the labels read) says otherwise for that customer
    and day, as in ``marts.customer_labels``; and whether a campaign treated the customer
    during the horizon (a campaign that worked makes a good churn score look wrong). Of
    several runs on one day by one model version, the last."""
    corrections = _exists(con, "marts", "label_corrections")  # built into the labels
    campaigns = _exists(con, "intermediate", "int_campaign_results")
    corrected = (
        """
        corrected as (
            select matured.scoring_run_id, matured.customer_id,
                case
                    when corrections.label = 'value_tier'
                        then corrections.corrected_value = 'lapsed'
                    else corrections.corrected_value = 'true'
                end as churned
            from matured
            inner join marts.label_corrections as corrections
                on corrections.customer_id = matured.customer_id
                and matured.as_of::date between corrections.valid_from and corrections.valid_to
            qualify row_number() over (
                partition by matured.scoring_run_id, matured.customer_id
                order by corrections.submitted_at desc, corrections.feedback_id desc
            ) = 1
        )"""
        if corrections
        else "corrected as (select null::varchar as scoring_run_id,"
        " null::varchar as customer_id, null::boolean as churned where false)"
    )
    treated = (
        f"""
        treated as (
            select distinct matured.scoring_run_id, matured.customer_id
            from matured
            inner join intermediate.int_campaign_results as results
                on results.customer_id = matured.customer_id
                and results.group_name = 'treatment'
                and results.assigned_at < matured.as_of + to_days({horizon_days})
                and results.window_end > matured.as_of
        )"""
        if campaigns
        else "treated as (select null::varchar as scoring_run_id,"
        " null::varchar as customer_id where false)"
    )
    return con.execute(
        f"""
        with last_day as (
            select max(ordered_on) as day from intermediate.int_order_lines_enriched
        ),
        runs as (
            select scoring_run_id, as_of, model_version, max(scored_at) as last_scored_at
            from marts.customer_scores_history
            group by scoring_run_id, as_of, model_version
            qualify row_number() over (
                partition by as_of, model_version
                order by last_scored_at desc, scoring_run_id desc
            ) = 1
        ),
        matured as (
            select history.*
            from marts.customer_scores_history as history
            inner join runs using (scoring_run_id), last_day
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
        ),
        {corrected},
        {treated}
        select matured.scoring_run_id, matured.model_version, matured.as_of,
            matured.churn_probability, matured.value_tier,
            coalesce(corrected.churned, coalesce(bought.orders, 0) = 0) as churned,
            corrected.churned is not null as corrected,
            treated.customer_id is not null as treated
        from matured
        left join bought using (scoring_run_id, customer_id)
        left join corrected using (scoring_run_id, customer_id)
        left join treated using (scoring_run_id, customer_id)
        """
    ).df()


def _auc(churned: np.ndarray, probability: np.ndarray) -> float:
    if 0 < churned.sum() < len(churned):
        return float(roc_auc_score(churned, probability))
    return float("nan")


def record(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    horizon_days: int,
    reference: dict[str, dict] | None = None,
    reference_name: str | None = None,
    measured: pd.DataFrame | None = None,
    measured_at: datetime | None = None,
) -> dict[str, pd.DataFrame]:
    """Compute and store the four tables for scoring run ``run_id`` (already published), in
    one transaction.

    Feature drift is ``measured`` (:func:`feature_drift`, when the run scored, at
    ``measured_at``: its ``computed_at``, which the retraining trigger compares with when a
    training took its data), or measured here and now against ``reference`` on
    ``marts.scoring_set``.
    ``champion_performance`` is replaced whole: every earlier run whose horizon has passed,
    measured on the labels known now."""
    # A rerun of the same scoring run keeps when it was first measured: the retraining
    # trigger reads drift measured since the last training, and a rerun measures no new data.
    now = _first_measured(con, run_id) or measured_at or datetime.now(UTC).replace(tzinfo=None)
    if measured is None:
        measured = feature_drift(con, reference, reference_name)
    features = measured.assign(scoring_run_id=run_id, computed_at=now)

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
            # Each run's scores, of the customers it scored: one new or gone is no score drift.
            was, now_scores = both[before].dropna(), both[metric].dropna()
            value = psi(was.to_numpy(float), now_scores.to_numpy(float))
            score_rows.append(
                {
                    "scoring_run_id": run_id,
                    "previous_run_id": previous_run,
                    "computed_at": now,
                    "score": metric,
                    "psi": value,
                    "current_mean": float(now_scores.mean()),
                    "previous_mean": float(was.mean()),
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

    perf = []
    realised = _performance(con, horizon_days)
    for (scored_run, version, as_of), group in realised.groupby(
        ["scoring_run_id", "model_version", "as_of"]
    ):
        churned = group["churned"].to_numpy(bool)
        untreated = ~group["treated"].to_numpy(bool)
        probability = group["churn_probability"].to_numpy(float)
        perf.append(
            {
                "scoring_run_id": run_id,
                "scored_run_id": scored_run,
                "model_version": version,
                "as_of": as_of,
                "customers": len(group),
                "churn_rate": float(churned.mean()),
                "churn_roc_auc": _auc(churned, probability),
                "lapsed_accuracy": float(((group["value_tier"] == "lapsed") == churned).mean()),
                "corrected_labels": int(group["corrected"].sum()),
                "untreated_customers": int(untreated.sum()),
                "untreated_churn_roc_auc": _auc(churned[untreated], probability[untreated]),
            }
        )
    champion_performance = pd.DataFrame(perf, columns=[c.split()[0] for c in PERFORMANCE])
    tables = {
        "feature_drift": features[[c.split()[0] for c in DDL["feature_drift"].split(", ")]],
        "score_drift": score_drift,
        "tier_migration": migration,
        "champion_performance": champion_performance,
    }
    con.execute("begin transaction")
    try:
        con.execute("create schema if not exists monitoring")
        for name, frame in tables.items():
            con.register("_frame", frame)
            con.execute(f"create table if not exists monitoring.{name} ({DDL[name]})")
            for column in DDL[name].split(","):  # a table from an earlier release gains columns
                con.execute(f"alter table monitoring.{name} add column if not exists {column}")
            if name == "champion_performance":  # measured afresh: every matured run, once
                con.execute(f"delete from monitoring.{name}")
            else:
                con.execute(f"delete from monitoring.{name} where scoring_run_id = ?", [run_id])
            con.execute(f"insert into monitoring.{name} by name select * from _frame")
            con.unregister("_frame")
    except BaseException:
        con.execute("rollback")
        raise
    con.execute("commit")
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
