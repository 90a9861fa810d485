"""Campaigns: the published scores become a campaign with randomised control groups.

`plan` reads ``marts.customer_scores`` (each row's next best action and the policy that chose
it) and writes one row per selected customer to ``marts.campaign_assignments``:

1. **Eligible**: the action is in the catalogue (dbt seed ``campaign_actions``) and allowed for
   the customer's tier and churn band; the customer is in no open campaign (one whose outcome
   window has not ended) and never unsubscribed.
2. **Exploration**: a random share (``VALUELOOP_CAMPAIGN_EXPLORATION_SHARE``) of the eligible
   customers gets a random eligible action instead (policy ``explore``), so the uplift model
   sees every action on every kind of customer, not only where the policy already sends it.
3. **Budget**: contact costs stop at ``VALUELOOP_CAMPAIGN_BUDGET``. The exploration share of
   it is kept for the explored customers (in random order), so a binding budget does not
   starve the uplift model of them; the rest goes to the policy's customers in order of
   priority (the uplift policy's expected incremental profit; the playbook's, and actions
   without an estimate, in random order after them). What one part leaves unspent goes to
   the other.
4. **Control groups**: within each action, stratified by segment and predicted tier, a share
   (``VALUELOOP_CAMPAIGN_CONTROL_SHARE``) is held out: systematic sampling in a random order,
   so each stratum gives floor or ceil of its share. Control customers are never contacted.

Every random draw is a hash of the campaign id and the customer, so planning a campaign again
gives the same rows. A campaign that has been planned is kept as it was exported: planning it
again (re-scoring the same data, a rerun of the DAG) returns it unchanged, since the
activation tool may already have sent the file; ``replace=True`` (``valueloop campaign plan
--replace``) plans it afresh, and only while none of its outcomes has come back.

The customer is pseudonymised (``customer_key``: the salted SHA-256 the dbt macro
``pseudonymise`` computes), and only the treatment group is exported, as CSV and Parquet, to
``exports/campaigns/<campaign_id>.*`` for the activation tool.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from ml.uplift_features import UPLIFT_FEATURES
from valueloop.config import Settings
from valueloop.ingest import ensure_raw_schema
from valueloop.quality.checks import table_exists
from valueloop.warehouse import connect

log = logging.getLogger(__name__)

ASSIGNMENTS = "marts.campaign_assignments"
CAMPAIGNS = "marts.campaigns"
FEATURES = "marts.campaign_customer_features"
NO_ACTION = "no_action"
EXPLORE = "explore"
EXPORT_COLUMNS = ("campaign_id", "customer_key", "action", "assigned_at", "window_days")

ASSIGNMENTS_DDL = f"""
create table if not exists {ASSIGNMENTS} (
    campaign_id varchar not null,
    customer_key varchar not null,
    action varchar not null,
    expected_cost double not null,
    group_name varchar not null,
    assigned_at timestamp not null,
    window_days integer not null,
    policy varchar not null,
    model_version varchar not null,
    expected_incremental_profit double,
    segment_name varchar,
    value_tier varchar,
    churn_risk_band varchar,
    scoring_run_id varchar,
    primary key (campaign_id, customer_key)
)
"""
CAMPAIGNS_DDL = f"""
create table if not exists {CAMPAIGNS} (
    campaign_id varchar primary key,
    as_of date not null,
    assigned_at timestamp not null,
    window_days integer not null,
    budget double not null,
    control_share double not null,
    exploration_share double not null,
    treated integer not null,
    control integer not null,
    cost double not null,
    policies varchar not null,
    planned_at timestamp not null,
    export_csv varchar not null,
    export_parquet varchar not null,
    excluded_open integer,
    excluded_unsubscribed integer
)
"""


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("create schema if not exists marts")
    con.execute(ASSIGNMENTS_DDL)
    con.execute(CAMPAIGNS_DDL)
    for column in ("excluded_open", "excluded_unsubscribed"):  # planned by an older version
        con.execute(f"alter table {CAMPAIGNS} add column if not exists {column} integer")
    features = ", ".join(f"{f} double" for f in UPLIFT_FEATURES)
    con.execute(
        f"create table if not exists {FEATURES} (campaign_id varchar not null, "
        f"customer_key varchar not null, {features}, primary key (campaign_id, customer_key))"
    )
    for feature in UPLIFT_FEATURES:  # a warehouse planned by an older version
        con.execute(f"alter table {FEATURES} add column if not exists {feature} double")


def customer_key(salt: str, customer_id: str) -> str:
    """The dbt macro ``pseudonymise``: sha256(salt || lower(trim(id))), hex."""
    return hashlib.sha256((salt + customer_id.strip().lower()).encode()).hexdigest()


def unit_hash(*parts: str) -> float:
    """A deterministic uniform draw in [0, 1) from text."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class CampaignSent(Exception):
    """The campaign already went out (outcomes came back): it is not planned again."""


@dataclass(frozen=True)
class Action:
    name: str
    cost: float
    discount: float
    tiers: frozenset[str]
    bands: frozenset[str]
    description: str


def load_actions(settings: Settings) -> dict[str, Action]:
    """The action catalogue: the dbt seed ``campaign_actions``."""
    path = settings.dbt_project_dir / "seeds" / "campaign_actions.csv"
    with path.open() as handle:
        return {
            row["action"]: Action(
                row["action"],
                float(row["cost_per_contact"]),
                float(row.get("discount") or 0),
                frozenset(row["eligible_tiers"].split("|")),
                frozenset(row["eligible_churn_bands"].split("|")),
                row["description"],
            )
            for row in csv.DictReader(handle)
        }


def eligible_actions(actions: dict[str, Action], tier: str, band: str) -> list[str]:
    return [a.name for a in actions.values() if tier in a.tiers and band in a.bands]


def control_flags(frame: pd.DataFrame, campaign_id: str, share: float) -> np.ndarray:
    """Systematic sampling per (action, segment, tier) stratum, in a hash order: the first
    unit of the stratum starts at a random offset, so each stratum holds out floor or ceil
    of share x its size, and the whole split is a function of the campaign id."""
    strata = ["action", "segment_name", "value_tier"]
    order = frame.assign(
        _u=[unit_hash(campaign_id, "control", k) for k in frame["customer_key"]],
        # A missing segment or tier is a stratum of its own (groupby would leave it out, and
        # its customers would all be treated), as campaign_performance reports it.
        **{c: frame[c].astype(object).where(frame[c].notna(), "unknown") for c in strata},
    ).sort_values([*strata, "_u"])
    rank = order.groupby(strata).cumcount().to_numpy()
    offset = np.array(
        [
            unit_hash(campaign_id, "stratum", str(a), str(s), str(t))
            for a, s, t in zip(
                order["action"], order["segment_name"], order["value_tier"], strict=True
            )
        ]
    )
    flags = np.floor((rank + 1) * share + offset) > np.floor(rank * share + offset)
    return pd.Series(flags, index=order.index).reindex(frame.index).to_numpy()


@dataclass(frozen=True)
class CampaignPlan:
    campaign_id: str
    as_of: date
    assigned_at: datetime
    treated: int
    control: int
    cost: float
    by_action: dict[str, tuple[int, int]]  # action -> (treated, control)
    policies: dict[str, int]
    excluded_open: int | None  # None: a campaign planned before these were recorded
    excluded_unsubscribed: int | None
    export_csv: Path
    export_parquet: Path
    # Planned earlier and returned as it was (planning again does not rewrite a campaign).
    kept: bool = False

    def summary(self) -> str:
        actions = ", ".join(f"{a} {t}+{c}" for a, (t, c) in sorted(self.by_action.items()))
        policies = ", ".join(f"{p} {n}" for p, n in sorted(self.policies.items()))
        kept = (
            " (kept as it was planned and exported; `valueloop campaign plan --replace` plans it"
            " afresh while no outcome has come back)"
            if self.kept
            else ""
        )
        return (
            f"campaign {self.campaign_id}{kept} (as of {self.as_of}, goes out "
            f"{self.assigned_at:%Y-%m-%d}): {self.treated:,} treated + {self.control:,} control, "
            f"contact cost {self.cost:,.2f}; per action (treated+control): {actions}; "
            f"policies: {policies}; left out: {_count(self.excluded_open)} in an open campaign, "
            f"{_count(self.excluded_unsubscribed)} unsubscribed\nexport: {self.export_csv}"
        )


def _count(n: int | None) -> str:
    return "n/a" if n is None else f"{n:,}"


def _candidates(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    score_columns = {r[0] for r in con.execute("describe marts.customer_scores").fetchall()}
    uplift = (
        "scores.expected_incremental_profit"
        if "expected_incremental_profit" in score_columns
        else "null::double as expected_incremental_profit"
    )
    policy = "scores.action_policy" if "action_policy" in score_columns else "'playbook'"
    features = ", ".join(
        f"scores.{f}" if f in ("p_high", "churn_probability") else f"features.{f}"
        for f in UPLIFT_FEATURES
    )
    return con.execute(
        f"""
        select scores.customer_id, scores.as_of, scores.value_tier, scores.churn_risk_band,
            scores.segment_name, scores.next_best_action, {policy} as policy, {uplift},
            scores.model_version, scores.scoring_run_id, {features}
        from marts.customer_scores as scores
        left join marts.scoring_set as features using (customer_id)
        order by scores.customer_id
        """
    ).df()


def plan(settings: Settings, campaign_id: str | None = None, replace: bool = False) -> CampaignPlan:
    """Plan a campaign from the published scores (see the module doc). A campaign of the same
    id that was planned before is returned as it is (``kept``), unless ``replace``; one whose
    outcomes have come back is never planned again (:class:`CampaignSent`)."""
    actions = load_actions(settings)
    salt = settings.resolve_pii_salt()
    with connect(settings.warehouse_path) as con:
        ensure_raw_schema(con)
        ensure_tables(con)
        scores = _candidates(con)
        if scores.empty:
            raise ValueError("marts.customer_scores is empty: score customers before planning")
        as_of = pd.Timestamp(scores["as_of"].max()).date()
        campaign_id = campaign_id or f"cmp-{as_of:%Y%m%d}"
        answered = con.execute(
            "select count(*) from raw.campaign_outcomes where campaign_id = ?", [campaign_id]
        ).fetchone()[0]
        if answered:
            raise CampaignSent(
                f"campaign {campaign_id} already went out ({answered:,} outcomes came back); "
                "it is not planned again (name a new one with --campaign-id)"
            )
        if not replace:
            stored = _stored(con, campaign_id)
            if stored is not None:
                _restore_exports(con, stored)
                return stored
        assigned_at = datetime.combine(as_of + timedelta(days=1), datetime.min.time())
        scores["customer_key"] = [customer_key(salt, c) for c in scores["customer_id"]]
        open_keys = {
            r[0]
            for r in con.execute(
                f"select customer_key from {ASSIGNMENTS} where campaign_id <> ? and "
                "assigned_at + to_days(window_days) > ?",
                [campaign_id, assigned_at],
            ).fetchall()
        }
        unsubscribed = {
            r[0]
            for r in con.execute(
                "select distinct customer_key from raw.campaign_outcomes"
                " where event = 'unsubscribed' and occurred_at < ?",
                [assigned_at],
            ).fetchall()
        }
        chosen = _choose(scores, actions, campaign_id, settings, open_keys | unsubscribed)
        chosen = _explored_estimates(con, chosen)
        chosen["group_name"] = np.where(
            control_flags(chosen, campaign_id, settings.campaign_control_share),
            "control",
            "treatment",
        )
        chosen = chosen.assign(
            campaign_id=campaign_id,
            expected_cost=[
                actions[a].cost if g == "treatment" else 0.0
                for a, g in zip(chosen["action"], chosen["group_name"], strict=True)
            ],
            assigned_at=assigned_at,
            window_days=settings.campaign_window_days,
        )
        excluded_open = int(scores["customer_key"].isin(open_keys).sum())
        excluded_unsubscribed = int(scores["customer_key"].isin(unsubscribed - open_keys).sum())
        # The files the activation tool reads appear only once the warehouse holds the plan:
        # written aside first, moved in place after the commit, so that a plan that fails to
        # store never reaches a campaign file.
        staged = _export(settings, chosen, campaign_id)
        export_csv, export_parquet = (path.with_name(path.name[1:-8]) for path in staged)
        try:
            _store(
                con,
                chosen,
                settings,
                campaign_id,
                as_of,
                assigned_at,
                export_csv,
                export_parquet,
                (excluded_open, excluded_unsubscribed),
            )
        except BaseException:
            for path in staged:
                path.unlink(missing_ok=True)
            raise
        for path, target in zip(staged, (export_csv, export_parquet), strict=True):
            path.replace(target)
    treated = chosen["group_name"] == "treatment"
    by_action = {
        a: (
            int((group["group_name"] == "treatment").sum()),
            int((group["group_name"] == "control").sum()),
        )
        for a, group in chosen.groupby("action")
    }
    return CampaignPlan(
        campaign_id,
        as_of,
        assigned_at,
        int(treated.sum()),
        int((~treated).sum()),
        float(chosen["expected_cost"].sum()),
        by_action,
        chosen["policy"].value_counts().to_dict(),
        excluded_open,
        excluded_unsubscribed,
        export_csv,
        export_parquet,
    )


def _stored(con: duckdb.DuckDBPyConnection, campaign_id: str) -> CampaignPlan | None:
    """The campaign as it was planned, from ``marts.campaigns`` and its assignments."""
    row = con.execute(
        f"select as_of, assigned_at, treated, control, cost, excluded_open,"
        f" excluded_unsubscribed, export_csv, export_parquet from {CAMPAIGNS}"
        " where campaign_id = ?",
        [campaign_id],
    ).fetchone()
    if row is None:
        return None
    as_of, assigned_at, treated, control, cost, excluded_open, excluded_unsub, csv_, pq = row
    by_action = {
        action: (int(t), int(c))
        for action, t, c in con.execute(
            f"select action, count(*) filter (where group_name = 'treatment'),"
            f" count(*) filter (where group_name = 'control') from {ASSIGNMENTS}"
            " where campaign_id = ? group by action",
            [campaign_id],
        ).fetchall()
    }
    policies = dict(
        con.execute(
            f"select policy, count(*) from {ASSIGNMENTS} where campaign_id = ? group by policy",
            [campaign_id],
        ).fetchall()
    )
    return CampaignPlan(
        campaign_id,
        as_of,
        assigned_at,
        int(treated),
        int(control),
        float(cost),
        by_action,
        policies,
        None if excluded_open is None else int(excluded_open),
        None if excluded_unsub is None else int(excluded_unsub),
        Path(csv_),
        Path(pq),
        kept=True,
    )


def _choose(
    scores: pd.DataFrame,
    actions: dict[str, Action],
    campaign_id: str,
    settings: Settings,
    excluded: set[str],
) -> pd.DataFrame:
    rows = scores[~scores["customer_key"].isin(excluded)].copy()
    eligible = [
        eligible_actions(actions, t, b)
        for t, b in zip(rows["value_tier"], rows["churn_risk_band"], strict=True)
    ]
    explore_u = np.array([unit_hash(campaign_id, EXPLORE, k) for k in rows["customer_key"]])
    pick_u = np.array([unit_hash(campaign_id, "action", k) for k in rows["customer_key"]])
    action, policy = [], []
    for i, (nba, pol, options) in enumerate(
        zip(rows["next_best_action"], rows["policy"], eligible, strict=True)
    ):
        if options and explore_u[i] < settings.campaign_exploration_share:
            action.append(options[int(pick_u[i] * len(options))])
            policy.append(EXPLORE)
        elif nba in options:
            action.append(nba)
            policy.append(pol)
        else:  # no action, or one this customer may not receive
            action.append(NO_ACTION)
            policy.append(pol)
    # object columns even with no row left (every customer excluded)
    rows["action"] = pd.Series(action, index=rows.index, dtype=object)
    rows["policy"] = pd.Series(policy, index=rows.index, dtype=object)
    rows = rows[rows["action"] != NO_ACTION].copy()
    rows["_u"] = [unit_hash(campaign_id, "budget", k) for k in rows["customer_key"]]
    rows["_cost"] = rows["action"].map({a: x.cost for a, x in actions.items()})
    # The policy's customers: expected incremental profit first where the uplift policy
    # estimated it, then the playbook's and those without an estimate, in random order.
    policy = rows[rows["policy"] != EXPLORE].assign(
        _priority=lambda r: (
            r["expected_incremental_profit"]
            .where(r["policy"].str.startswith("uplift"))
            .fillna(-np.inf)
        )
    )
    policy = policy.sort_values(["_priority", "_u"], ascending=[False, True])
    explored = rows[rows["policy"] == EXPLORE].sort_values("_u")
    budget = settings.campaign_budget
    # The exploration share of the budget is the explored customers'; what either part
    # leaves unspent goes to the other.
    explore_spent = _spent(explored["_cost"], budget * settings.campaign_exploration_share)
    take_policy = _within(policy["_cost"], budget - explore_spent)
    take_explored = _within(explored["_cost"], budget - policy["_cost"][take_policy].sum())
    chosen = pd.concat([policy[take_policy], explored[take_explored]])
    # The campaign's rows in priority order: the uplift policy's best expected profit first,
    # then the playbook's and the explored customers in random order (those without an
    # estimate last).
    chosen["_priority"] = chosen["expected_incremental_profit"].where(
        chosen["policy"].str.startswith("uplift"), -np.inf
    )
    chosen = chosen.sort_values(["_priority", "_u"], ascending=[False, True])
    return chosen.drop(columns=["_priority", "_u", "_cost"]).reset_index(drop=True)


def _restore_exports(con: duckdb.DuckDBPyConnection, plan: CampaignPlan) -> None:
    """A stored plan's campaign files, written again from its assignments when they are
    missing (a process that died between the commit and moving the files in place)."""
    if plan.export_csv.exists() and plan.export_parquet.exists():
        return
    rows = con.execute(
        f"select {', '.join(EXPORT_COLUMNS)} from {ASSIGNMENTS} where campaign_id = ?"
        " and group_name = 'treatment' order by customer_key",
        [plan.campaign_id],
    ).df()
    plan.export_csv.parent.mkdir(parents=True, exist_ok=True)
    for target, write in (
        (plan.export_csv, lambda path: rows.to_csv(path, index=False)),
        (plan.export_parquet, lambda path: rows.to_parquet(path, index=False)),
    ):
        partial = target.with_name(f".{target.name}.partial")
        write(partial)
        partial.replace(target)
    log.warning("campaign %s: its files were missing and were written again", plan.campaign_id)


def _explored_estimates(con: duckdb.DuckDBPyConnection, chosen: pd.DataFrame) -> pd.DataFrame:
    """An explored customer's expected incremental profit is the uplift model's estimate of
    the action drawn for them (null without one), not that of their policy's action, which
    the scores hold."""
    explored = chosen["policy"] == EXPLORE
    if not explored.any():
        return chosen
    estimates: dict[tuple[str, str], float] = {}
    # The candidate tables are the latest scoring run's, published or not: only the run whose
    # scores the campaign reads speaks for its customers.
    published = set(chosen["scoring_run_id"].dropna())
    candidate_run = (
        con.execute(
            "select any_value(scoring_run_id) from scoring.candidate_predictions"
        ).fetchone()[0]
        if table_exists(con, "scoring.candidate_predictions")
        else None
    )
    same_run = published == {candidate_run}
    if not same_run:
        log.warning(
            "the latest scoring run (%s) is not the published one (%s): explored customers get"
            " no profit estimate",
            candidate_run,
            ", ".join(sorted(published)),
        )
    if same_run and table_exists(con, "scoring.candidate_uplift"):
        estimates = {
            (customer, action): profit
            for customer, action, profit in con.execute(
                "select customer_id, action, expected_incremental_profit"
                " from scoring.candidate_uplift"
            ).fetchall()
        }
    chosen = chosen.copy()
    chosen.loc[explored, "expected_incremental_profit"] = [
        estimates.get((customer, action), np.nan)
        for customer, action in zip(
            chosen.loc[explored, "customer_id"], chosen.loc[explored, "action"], strict=True
        )
    ]
    return chosen


def _within(costs: pd.Series, budget: float) -> np.ndarray:
    """Which of ``costs``, taken in order, fit in ``budget`` (a prefix)."""
    return np.cumsum(costs.to_numpy(dtype=float)) <= budget + 1e-9


def _spent(costs: pd.Series, budget: float) -> float:
    return float(costs[_within(costs, budget)].sum())


def _export(settings: Settings, chosen: pd.DataFrame, campaign_id: str) -> tuple[Path, Path]:
    """The treatment group for the activation tool (control customers are not contacted),
    written aside as ``.<id>.csv.partial`` and ``.<id>.parquet.partial``: the caller moves
    them in place once the plan is stored."""
    folder = settings.campaigns_dir
    folder.mkdir(parents=True, exist_ok=True)
    out = chosen.loc[chosen["group_name"] == "treatment", list(EXPORT_COLUMNS)]
    out = out.sort_values("customer_key")
    csv_path = folder / f".{campaign_id}.csv.partial"
    parquet_path = folder / f".{campaign_id}.parquet.partial"
    out.to_csv(csv_path, index=False)
    out.to_parquet(parquet_path, index=False)
    return csv_path, parquet_path


def _store(
    con: duckdb.DuckDBPyConnection,
    chosen: pd.DataFrame,
    settings: Settings,
    campaign_id: str,
    as_of: date,
    assigned_at: datetime,
    export_csv: Path,
    export_parquet: Path,
    excluded: tuple[int, int],
) -> None:
    columns = [
        "campaign_id",
        "customer_key",
        "action",
        "expected_cost",
        "group_name",
        "assigned_at",
        "window_days",
        "policy",
        "model_version",
        "expected_incremental_profit",
        "segment_name",
        "value_tier",
        "churn_risk_band",
        "scoring_run_id",
    ]
    con.register("_chosen", chosen)
    con.execute("begin transaction")
    try:
        for table in (ASSIGNMENTS, FEATURES, CAMPAIGNS):
            con.execute(f"delete from {table} where campaign_id = ?", [campaign_id])
        con.execute(f"insert into {ASSIGNMENTS} select {', '.join(columns)} from _chosen")
        con.execute(
            f"insert into {FEATURES} (campaign_id, customer_key, {', '.join(UPLIFT_FEATURES)}) "
            f"select campaign_id, customer_key, "
            f"{', '.join(f'{f}::double' for f in UPLIFT_FEATURES)} from _chosen"
        )
        treated = chosen["group_name"] == "treatment"
        con.execute(
            f"insert into {CAMPAIGNS} (campaign_id, as_of, assigned_at, window_days, budget,"
            " control_share, exploration_share, treated, control, cost, policies, planned_at,"
            " export_csv, export_parquet, excluded_open, excluded_unsubscribed)"
            " values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now(), ?, ?, ?, ?)",
            [
                campaign_id,
                as_of,
                assigned_at,
                settings.campaign_window_days,
                settings.campaign_budget,
                settings.campaign_control_share,
                settings.campaign_exploration_share,
                int(treated.sum()),
                int((~treated).sum()),
                float(chosen["expected_cost"].sum()),
                ", ".join(f"{p} {n}" for p, n in chosen["policy"].value_counts().items()),
                str(export_csv),
                str(export_parquet),
                *excluded,
            ],
        )
        con.execute("commit")
    except BaseException:
        con.execute("rollback")
        raise
    finally:
        con.unregister("_chosen")
