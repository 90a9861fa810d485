"""The loop on the demo shop: a campaign goes out, the market answers, the answer comes back.

`simulate_campaign` is the outside world for a planned campaign: the demo shop's market
(:mod:`valueloop.market`) plays the outcome window, the new order lines land where the
simulator's files are, and the activation tool's outcome file lands in
``landing/feedback/campaign_outcomes/``. From there the platform takes over exactly as it
would for a real shop: the feedback DAG ingests, checks and rebuilds, retraining follows its
triggers, scoring picks the next actions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from valueloop import market
from valueloop.campaigns import CAMPAIGNS, customer_key
from valueloop.config import Settings
from valueloop.quality.checks import table_exists
from valueloop.warehouse import connect

log = logging.getLogger(__name__)


def latest_campaign(settings: Settings) -> str:
    with connect(settings.warehouse_path) as con:
        row = (
            con.execute(
                f"select campaign_id from {CAMPAIGNS} order by assigned_at desc limit 1"
            ).fetchone()
            if table_exists(con, CAMPAIGNS)
            else None
        )
    if row is None:
        raise LookupError("no campaign has been planned yet: run `valueloop campaign plan`")
    return row[0]


def simulate_campaign(
    settings: Settings, campaign_id: str | None = None, campaign_file: Path | None = None
) -> market.WindowSummary:
    """Play the demo shop's market through a campaign's outcome window (module doc), from the
    campaign file the platform exported for the activation tool (``exports/campaigns/<id>
    .parquet``, or ``campaign_file``: the treated customers only, as a real activation tool
    gets them; the control group is never sent, so the market never hears of it)."""
    if campaign_file is None:
        campaign_id = campaign_id or latest_campaign(settings)
    path = campaign_file or settings.campaigns_dir / f"{campaign_id}.parquet"
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no exported file for campaign {campaign_id or '(from the file)'};"
            " plan it first (valueloop campaign plan)"
        )
    sent = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    missing = {"campaign_id", "customer_key", "action", "assigned_at", "window_days"} - set(sent)
    if missing:
        raise ValueError(f"{path}: a campaign file needs the columns {sorted(missing)}")
    if campaign_id is None:  # a file given on its own names its campaign
        found = sorted(set(sent["campaign_id"].astype(str)))
        if len(found) != 1:
            raise ValueError(f"{path}: one campaign per file, found {found or 'no rows'}")
        campaign_id = found[0]
    others = set(sent["campaign_id"].astype(str)) - {campaign_id}
    if others:
        raise ValueError(f"{path}: rows of campaigns {sorted(others)}, not only {campaign_id}")
    if sent.empty:  # nobody was sent anything (a zero budget): the window still passes
        with connect(settings.warehouse_path) as con:
            meta = con.execute(
                f"select assigned_at, window_days from {CAMPAIGNS} where campaign_id = ?",
                [campaign_id],
            ).fetchone()
        if meta is None:
            raise LookupError(f"no campaign {campaign_id} in {CAMPAIGNS}")
        sent = sent.astype({"campaign_id": str})
        starts, windows = [pd.Timestamp(meta[0])], [meta[1]]
    else:
        starts = pd.to_datetime(sent["assigned_at"]).unique()
        windows = sent["window_days"].unique()
    if len(starts) != 1 or len(windows) != 1:
        raise ValueError(f"{path}: one assigned_at and one window_days per campaign file")
    # The market is the outside world: it knows who its customers are.
    salt = settings.resolve_pii_salt()
    ids = pq.read_table(settings.demo_dir / "customers.parquet", columns=["customer_id"])
    keys = pd.DataFrame({"customer_id": ids.column("customer_id").to_pylist()})
    keys["customer_key"] = [customer_key(salt, c) for c in keys["customer_id"]]
    assignments = sent.assign(group_name="treatment").merge(keys, on="customer_key", how="inner")
    unknown = len(sent) - len(assignments)
    if unknown:
        # Keys the market cannot place were pseudonymised with another salt or belong to
        # another shop: playing the campaign without them would measure a different one.
        raise ValueError(
            f"{path}: {unknown:,} of {len(sent):,} customer_key values match no customer of"
            f" the demo shop in {settings.demo_dir} (keys made with another"
            " VALUELOOP_PII_SALT, or another shop's campaign)"
        )
    summary = market.advance(
        settings.demo_dir,
        assignments,
        pd.Timestamp(starts[0]).to_pydatetime(),
        int(windows[0]),
        settings.feedback_dir / "campaign_outcomes",
        settings.demo_seed,
        settings.feedback_dir / "label_feedback",
    )
    log.info("%s", summary.summary())
    return summary


@dataclass(frozen=True)
class ActionResult:
    action: str
    treated: int
    control: int
    uplift: float
    ci_low: float
    ci_high: float
    incremental_revenue: float
    incremental_profit: float
    too_small: bool
    unsubscribe_rate: float


def measured(settings: Settings, campaign_id: str) -> list[ActionResult]:
    """What campaign_performance measured for a campaign, per action (all segments)."""
    with connect(settings.warehouse_path) as con:
        rows = con.execute(
            "select action, treated, control, uplift, uplift_ci_low, uplift_ci_high,"
            " incremental_revenue, incremental_profit, is_too_small, unsubscribe_rate"
            " from marts.campaign_performance where campaign_id = ? and segment_name = 'all'"
            " and value_tier = 'all' order by incremental_profit desc",
            [campaign_id],
        ).fetchall()
    return [ActionResult(*row) for row in rows]


def corrected_labels(settings: Settings) -> tuple[int, int]:
    """Labelled rows (customer and cutoff) whose label a correction decided, of all."""
    with connect(settings.warehouse_path) as con:
        corrected, labelled = con.execute(
            "select count(*) filter (where label_source <> 'derived'), count(*)"
            " from marts.customer_labels"
        ).fetchone()
    return int(corrected), int(labelled)


@dataclass(frozen=True)
class CycleResult:
    cycle: int
    campaign_id: str
    window: market.WindowSummary
    measured: list[ActionResult]
    retrain_reason: str
    customer_model: dict | None
    uplift_model: dict | None
    next_campaign: str
    next_policies: dict[str, int]
    labels_corrected: tuple[int, int] = (0, 0)  # (corrected, labelled) after the cycle

    def lines(self) -> list[str]:
        out = [
            f"cycle {self.cycle}: campaign {self.campaign_id} "
            f"({self.window.start:%Y-%m-%d} to {self.window.end:%Y-%m-%d})"
        ]
        for a in self.measured:
            out.append(
                f"  {a.action:<24} uplift {a.uplift:+.3f} [{a.ci_low:+.3f}, {a.ci_high:+.3f}]"
                f"  incremental revenue {a.incremental_revenue:+,.0f}"
                f"  profit {a.incremental_profit:+,.0f}  unsubscribed {a.unsubscribe_rate:.1%}"
                f"  ({a.treated}+{a.control})" + ("  too small to tell" if a.too_small else "")
            )
        if self.window.corrections:
            corrected, labelled = self.labels_corrected
            out.append(
                f"  label corrections: {self.window.corrections:,} from the"
                f" {market.B2B_SOURCE} ({market.B2B_REASON}); {corrected:,} of"
                f" {labelled:,} labels now follow a correction"
            )
        out.append(f"  retraining: {self.retrain_reason}")
        if not self.customer_model and not self.uplift_model:
            out.append("  champions unchanged (nothing retrained)")
        if self.customer_model:
            out.append(f"  customer model: {self.customer_model['reason']}")
        elif self.uplift_model:
            out.append("  customer model: not retrained, its champion unchanged")
        if self.uplift_model:
            out.append(f"  uplift model: {self.uplift_model['summary']}")
        elif self.customer_model:
            out.append("  uplift model: not retrained, its champion unchanged")
        policies = ", ".join(f"{p} {n:,}" for p, n in sorted(self.next_policies.items()))
        out.append(f"  next: {self.next_campaign} ({policies})")
        return out


def run_cycle(settings: Settings, cycle: int, board=None) -> CycleResult:
    """One turn of the loop on the demo shop, with the functions the DAG tasks call:
    market -> ingest orders and feedback -> checks -> dbt -> retraining triggers -> retrain and
    gate -> score and publish (monitoring included) -> plan the next campaign."""
    from contextlib import nullcontext

    from ml.score import score
    from valueloop import campaigns, jobs, pipeline, transform
    from valueloop.quality.runner import default_run_id, run_checkpoint
    from valueloop.retraining import decide

    label = f"loop cycle {cycle}"

    def step(text: str) -> None:
        if board:
            board.update(label, text)

    campaign_id = latest_campaign(settings)
    run_id = default_run_id() + f"-cycle{cycle}"
    with board.stage(label, "market") if board else nullcontext():
        # A cycle that stopped after the market (a failed check, say) carries on from the
        # market's files when it is run again: the window is played once.
        window = market.played(settings.demo_dir, campaign_id)
        if window is None:
            step(f"the demo market answers {campaign_id}")
            window = simulate_campaign(settings, campaign_id)
        else:
            step(f"the demo market answered {campaign_id} before: carrying on from its files")
        step("orders and outcomes: ingest, checks, dbt")
        jobs.ingest_path(settings, settings.demo_dir, "simulator")
        jobs.ingest_path(settings, settings.feedback_dir, "feedback")
        run_checkpoint(settings, "raw", run_id)
        transform.build(settings, quiet=True)
        run_checkpoint(settings, "marts", run_id)
        decision = decide(settings)
        customer = uplift = None
        step(f"retraining: {decision.reason}")
        if decision.customer_model:
            snapshot = pipeline.snapshot_training_data(settings, run_id)
            customer = pipeline.train_and_gate(
                settings, snapshot, "; ".join(decision.customer_model)
            )
        if decision.uplift_model:
            uplift = pipeline.train_uplift(settings, "; ".join(decision.uplift_model))
        step("score, publish, plan the next campaign")
        score(settings, run_id)
        plan = campaigns.plan(settings)
        step(f"{campaign_id} measured; next {plan.campaign_id}")
    return CycleResult(
        cycle,
        campaign_id,
        window,
        measured(settings, campaign_id),
        decision.reason,
        customer,
        uplift,
        plan.campaign_id,
        plan.policies,
        corrected_labels(settings),
    )


def run_cycles(settings: Settings, cycles: int, board=None) -> list[CycleResult]:
    """``cycles`` turns of the loop, each numbered by the campaign it measures: a data folder's
    n-th campaign is measured by its cycle n, however many commands it took to get there."""
    return [run_cycle(settings, campaigns_planned(settings), board) for _ in range(cycles)]


def campaigns_planned(settings: Settings) -> int:
    """How many campaigns this data folder has planned (the latest is the next measured)."""
    with connect(settings.warehouse_path) as con:
        if not table_exists(con, CAMPAIGNS):
            return 0
        return int(con.execute(f"select count(*) from {CAMPAIGNS}").fetchone()[0])
