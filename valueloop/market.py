"""The demo shop's market: what a campaign really does, kept apart from what the platform sees.

`advance` plays the shop forward by one outcome window after a campaign goes out:

* every customer still active buys as the simulator's behaviour model says (their latent rate,
  the season, a drifting interest, and dropout after each purchase);
* a treated customer's purchases change by a **hidden, heterogeneous effect** of the action
  and the customer's latent type (:data:`TRUE_EFFECTS`): an extra order with some probability,
  a discount on every order in the window (to a loyal customer who would have bought
  anyway it only gives money away), a chance to come back after dropping out, and a chance to
  unsubscribe;
* the activation tool reports delivered, opened, clicked, converted (with the order's
  revenue) and unsubscribed events for the treated group;
* some customers who stop buying have not left: they moved to the shop's B2B account, where
  this shop's data does not follow them (:data:`B2B_MOVE_SHARE` of those who drop out). The
  B2B account team says so, as label corrections (``is_churned`` = false from the day of their
  last order here); its first file also lists the moves of the year before.

It writes what a shop would send (new order lines as a simulator part file, the outcome file
and the label corrections in the landing folder), updates the latent state (dropouts,
revivals) and records the true expected effect of every action on every campaign customer
under ``latent/campaigns/``, which only benchmarks read. :func:`expected_incremental_profit`
is that truth for any customers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from valueloop.simulator import (
    CUSTOMER_TYPES,
    FIRST_INVOICE,
    _product_choice_cdfs,
    seasonality,
)

TYPE_NAMES = tuple(t.name for t in CUSTOMER_TYPES)
GUEST_ORDER_SHARE = 0.12
# Of the customers who stop buying, the share who moved to the shop's B2B account (decided by
# a hash of the seed and the customer, so the same customers in every window and rerun).
B2B_MOVE_SHARE = 0.03
B2B_SOURCE = "b2b account team"
B2B_REASON = "did not churn: moved to the B2B account"
B2B_BACKLOG_DAYS = 365  # the team's first file lists the moves of the year before


@dataclass(frozen=True)
class Effect:
    lift: float = 0.0  # probability of one extra order in the window, if still active
    discount: float = 0.0  # price cut on every order of the window
    revive: float = 0.0  # probability that a customer who dropped out comes back and buys
    unsubscribe: float = 0.0  # probability of unsubscribing from further campaigns


# (action, latent type) -> effect. The platform never reads this table.
TRUE_EFFECTS: dict[tuple[str, str], Effect] = {
    ("nurture_email", "loyal_high_value"): Effect(lift=0.01),
    ("nurture_email", "regular"): Effect(lift=0.05),
    ("nurture_email", "bargain_hunter"): Effect(lift=0.01),
    ("nurture_email", "one_off"): Effect(unsubscribe=0.04),
    ("nurture_email", "drifting_away"): Effect(lift=0.04, revive=0.01),
    ("cross_sell", "loyal_high_value"): Effect(lift=0.08),
    ("cross_sell", "regular"): Effect(lift=0.08),
    ("cross_sell", "bargain_hunter"): Effect(unsubscribe=0.02),
    ("cross_sell", "one_off"): Effect(unsubscribe=0.03),
    ("cross_sell", "drifting_away"): Effect(lift=0.02),
    ("reactivation_email", "regular"): Effect(lift=0.02, revive=0.02),
    ("reactivation_email", "bargain_hunter"): Effect(lift=0.02, revive=0.02),
    ("reactivation_email", "one_off"): Effect(revive=0.01, unsubscribe=0.05),
    ("reactivation_email", "drifting_away"): Effect(lift=0.10, revive=0.08),
    ("vip_perk", "loyal_high_value"): Effect(lift=0.15),
    ("vip_perk", "regular"): Effect(lift=0.08),
    ("vip_perk", "bargain_hunter"): Effect(lift=0.03),
    ("vip_perk", "drifting_away"): Effect(lift=0.05, revive=0.02),
    ("win_back_offer", "loyal_high_value"): Effect(discount=0.15),
    ("win_back_offer", "regular"): Effect(lift=0.05, discount=0.15, revive=0.03),
    ("win_back_offer", "bargain_hunter"): Effect(lift=0.25, discount=0.15, revive=0.10),
    ("win_back_offer", "one_off"): Effect(lift=0.03, discount=0.15, revive=0.03),
    ("win_back_offer", "drifting_away"): Effect(lift=0.15, discount=0.15, revive=0.15),
    ("premium_win_back_offer", "loyal_high_value"): Effect(discount=0.25),
    ("premium_win_back_offer", "regular"): Effect(lift=0.06, discount=0.25, revive=0.04),
    ("premium_win_back_offer", "bargain_hunter"): Effect(lift=0.30, discount=0.25, revive=0.12),
    ("premium_win_back_offer", "one_off"): Effect(lift=0.05, discount=0.25, revive=0.05),
    ("premium_win_back_offer", "drifting_away"): Effect(lift=0.18, discount=0.25, revive=0.20),
}
NO_EFFECT = Effect()
# The activation tool's funnel for a treated customer.
P_DELIVERED, P_OPENED, P_CLICKED = 0.97, 0.45, 0.35


def effect(action: str, customer_type: str) -> Effect:
    return TRUE_EFFECTS.get((action, customer_type), NO_EFFECT)


def _catalogue(shop: Path) -> dict[str, np.ndarray]:
    products = pq.read_table(shop / "products.parquet").to_pandas()
    names = sorted(products["category"].unique())
    return {
        "sku": products["sku"].to_numpy(object),
        "description": products["description"].to_numpy(object),
        "list_price": products["list_price"].to_numpy(float),
        "category_idx": products["category"].map({c: i for i, c in enumerate(names)}).to_numpy(),
    }


def _type_index(types: pd.Series) -> np.ndarray:
    return types.map({n: i for i, n in enumerate(TYPE_NAMES)}).to_numpy()


def _order_value(catalogue: dict[str, np.ndarray], years: float) -> np.ndarray:
    """Expected merchandise value of one order, per latent type (unit spend multiplier)."""
    cdfs = _product_choice_cdfs(catalogue)
    pmf = np.diff(cdfs[:, -1, :], axis=1, prepend=0.0)
    prices = catalogue["list_price"] * (1.0 + 0.03 * years)
    mean_price = pmf @ prices
    on_sale = np.array([t.discount_share for t in CUSTOMER_TYPES])
    lines = np.array([t.lines_per_order for t in CUSTOMER_TYPES])
    return mean_price * (1.0 - 0.3 * on_sale) * lines


def _window_rate(start: datetime, days: int) -> float:
    """Mean seasonal intensity over the window."""
    day0 = (start.date() - date(start.year, 1, 1)).days
    return float(seasonality(np.arange(day0, day0 + days) % 365.25).mean())


def _state(shop: Path, start: datetime) -> pd.DataFrame:
    truth = pq.read_table(shop / "latent" / "customer_truth.parquet").to_pandas()
    customers = pq.read_table(shop / "customers.parquet").to_pandas()[
        ["customer_id", "signed_up_at"]
    ]
    truth = truth.merge(customers, on="customer_id")
    truth["active"] = truth["dropped_out_at"].isna() | (truth["dropped_out_at"] >= start)
    return truth


@dataclass(frozen=True)
class WindowExpectation:
    """What the market expects of each customer in a window, untreated (the truth)."""

    customer_type: np.ndarray  # latent type names
    active: np.ndarray  # not dropped out when the window starts
    base_orders: np.ndarray  # expected orders in the window without a campaign
    order_value: np.ndarray  # expected merchandise value of one order

    def with_action(self, action: str) -> tuple[np.ndarray, np.ndarray]:
        """(expected orders, price factor) of each customer if treated with ``action``."""
        eff = [effect(action, t) for t in self.customer_type]
        lift = np.array([e.lift for e in eff])
        revive = np.array([e.revive for e in eff])
        discount = np.array([e.discount for e in eff])
        return np.where(self.active, self.base_orders + lift, revive), 1.0 - discount

    def unsubscribes(self, action: str) -> np.ndarray:
        """Each customer's probability of unsubscribing if sent ``action`` (a message must
        be delivered first)."""
        return P_DELIVERED * np.array([effect(action, t).unsubscribe for t in self.customer_type])


def expectation(
    shop: Path, customer_ids: pd.Series, start: datetime, days: int
) -> WindowExpectation:
    manifest = json.loads((shop / "manifest.json").read_text())
    origin = date.fromisoformat(manifest["start"])
    state = _state(shop, start).set_index("customer_id").loc[customer_ids.to_numpy()]
    years = (start.date() - origin).days / 365.25
    value = _order_value(_catalogue(shop), years)[_type_index(state["customer_type"])]
    active = state["active"].to_numpy()
    rate = state["orders_per_year"].to_numpy() * _window_rate(start, days) * days / 365.25
    return WindowExpectation(
        state["customer_type"].to_numpy(object),
        active,
        np.where(active, rate, 0.0),
        value * (1.0 + 1.5 * state["spend_multiplier"].to_numpy()),
    )


def expected_incremental_profit(
    shop: Path,
    customer_ids: pd.Series,
    actions: list[str],
    start: datetime,
    days: int,
    margin: float,
    costs: dict[str, float],
    unsubscribe_cost: float = 0.0,
) -> pd.DataFrame:
    """The truth: each customer's expected incremental profit for each action in the window
    starting at ``start`` (rows: customers in the given order; columns: actions), the
    expected unsubscribes charged at ``unsubscribe_cost`` each. ``margin`` is of the list
    price: the goods of an order cost ``1 - margin`` of its list value whatever it sells
    for, so a discount comes out of the profit whole (until 2026-11-28 it was charged at
    ``margin`` of the revenue it took off, as if the goods got cheaper too)."""
    window = expectation(shop, customer_ids, start, days)
    out = {}
    for action in actions:
        orders, price = window.with_action(action)
        gross = window.order_value * (orders * (price - (1 - margin)) - margin * window.base_orders)
        out[action] = gross - costs[action] - unsubscribe_cost * window.unsubscribes(action)
    return pd.DataFrame(out, index=customer_ids.index)


@dataclass(frozen=True)
class WindowSummary:
    campaign_id: str
    start: datetime
    end: datetime
    orders: int
    order_lines: int
    incremental_orders: int
    revived: int
    dropped_out: int
    events: int
    outcomes_file: Path
    corrections: int = 0  # label corrections the B2B account team sent
    corrections_file: Path | None = None

    def summary(self) -> str:
        sent = (
            f"; {self.corrections:,} label corrections in {self.corrections_file}"
            if self.corrections
            else ""
        )
        return (
            f"market {self.start:%Y-%m-%d} to {self.end:%Y-%m-%d} after {self.campaign_id}: "
            f"{self.orders:,} orders ({self.order_lines:,} lines; {self.incremental_orders:,} "
            f"caused by the campaign, {self.revived:,} customers won back), "
            f"{self.dropped_out:,} customers dropped out, {self.events:,} activation events "
            f"in {self.outcomes_file}{sent}"
        )


def played(shop: Path, campaign_id: str) -> WindowSummary | None:
    """The summary of the window the market already played for ``campaign_id``; None when it
    has not played it. (A window played before summaries were kept is an error: its files are
    there, its figures are not.)"""
    manifest = json.loads((shop / "manifest.json").read_text())
    if campaign_id not in manifest.get("windows", {}):
        return None
    kept = manifest.get("window_summaries", {}).get(campaign_id)
    if kept is None:
        raise ValueError(
            f"{shop}: the market played campaign {campaign_id}'s window with an earlier version"
            " that kept no summary of it; plan a new campaign"
        )
    return WindowSummary(
        campaign_id,
        datetime.fromisoformat(kept["start"]),
        datetime.fromisoformat(kept["end"]),
        kept["orders"],
        kept["order_lines"],
        kept["incremental_orders"],
        kept["revived"],
        kept["dropped_out"],
        kept["events"],
        Path(kept["outcomes_file"]),
        kept.get("corrections", 0),  # windows played before the B2B account team existed
        Path(kept["corrections_file"]) if kept.get("corrections_file") else None,
    )


def moved_to_b2b(seed: int, customer_ids) -> np.ndarray:
    """Whether each customer, once they stop buying here, moved to the B2B account."""
    from valueloop.campaigns import unit_hash

    return np.array([unit_hash("b2b", str(seed), str(c)) < B2B_MOVE_SHARE for c in customer_ids])


def b2b_corrections(
    customer_ids: np.ndarray, last_orders: pd.DatetimeIndex, submitted_at: datetime
) -> pd.DataFrame:
    """The B2B account team's file: each moved customer did not churn, from the day of their
    last order in this shop on (a ``raw.label_feedback`` file, by the contract)."""
    days = pd.DatetimeIndex(last_orders).normalize()
    return pd.DataFrame(
        {
            "feedback_id": [f"b2b-{c}-{d:%Y%m%d}" for c, d in zip(customer_ids, days, strict=True)],
            "customer_id": pd.Series(customer_ids, dtype=object).astype(str),
            "label": "is_churned",
            "corrected_value": "false",
            "valid_from": days.strftime("%Y-%m-%d"),
            "valid_to": "",
            "reason": B2B_REASON,
            "source": B2B_SOURCE,
            "submitted_at": f"{submitted_at:%Y-%m-%d} 09:00:00",
        }
    )


def advance(
    shop: Path,
    assignments: pd.DataFrame,
    start: datetime,
    days: int,
    outcomes_dir: Path,
    seed: int,
    corrections_dir: Path | None = None,
) -> WindowSummary:
    """Play the shop forward ``days`` from ``start`` under a campaign (see the module doc).

    ``assignments`` has customer_id, customer_key, action and group_name per campaign customer
    and campaign_id; customers not in it are untreated. Re-running the same window rewrites the
    same files (the draws are seeded by the seed and the campaign id). The B2B account team's
    label corrections go to ``corrections_dir`` (default: ``label_feedback/`` beside
    ``outcomes_dir``), ``<campaign id>.csv``, when it has any.
    """
    campaign_id = str(assignments["campaign_id"].iloc[0]) if len(assignments) else "none"
    rng = np.random.default_rng([seed, *campaign_id.encode()])
    manifest = json.loads((shop / "manifest.json").read_text())
    if campaign_id in manifest.get("windows", {}):
        raise ValueError(
            f"{shop}: the market already played campaign {campaign_id}'s window "
            f"({manifest['windows'][campaign_id]}); plan a new campaign first"
        )
    # The market moves forward: a window over days it already played would draw every
    # customer's purchases of those days again (and their orders would be counted twice).
    for other, window in manifest.get("windows", {}).items():
        _, played_end = (date.fromisoformat(d) for d in window.split("/"))
        if start.date() < played_end:
            raise ValueError(
                f"{shop}: campaign {campaign_id}'s window starts {start:%Y-%m-%d}, inside the"
                f" window the market already played for campaign {other} ({window}); plan the"
                f" next campaign from scores as of {played_end - timedelta(days=1)} or later"
            )
    origin = date.fromisoformat(manifest["start"])
    catalogue = _catalogue(shop)
    cdfs = _product_choice_cdfs(catalogue)
    state = _state(shop, start)
    n = len(state)
    type_idx = _type_index(state["customer_type"])
    treated = assignments[assignments["group_name"] == "treatment"].set_index("customer_id")
    action = state["customer_id"].map(treated["action"]).fillna("")
    eff = [
        effect(a, t) if a else NO_EFFECT
        for a, t in zip(action, state["customer_type"], strict=True)
    ]
    lift = np.array([e.lift for e in eff])
    discount = np.array([e.discount for e in eff])
    revive = np.array([e.revive for e in eff])
    unsubscribe = np.array([e.unsubscribe for e in eff])
    active = state["active"].to_numpy().copy()

    # Natural orders: Poisson in the window, each followed by dropout with the customer's p.
    day_grid = np.arange(days)
    day0 = (start.date() - date(start.year, 1, 1)).days
    season = seasonality((day0 + day_grid) % 365.25)
    rate = state["orders_per_year"].to_numpy()
    counts = rng.poisson(np.where(active, rate * season.sum() / 365.25, 0.0))
    owner = np.repeat(np.arange(n), counts)
    day = rng.choice(days, len(owner), p=season / season.sum()) + rng.random(len(owner))
    order = np.lexsort((day, owner))
    owner, day = owner[order], day[order]
    drop = rng.random(len(owner)) < state["dropout_probability"].to_numpy()[owner]
    first_drop = np.full(n, np.inf)
    np.minimum.at(first_drop, owner[drop], day[drop])
    keep = day <= first_drop[owner]
    owner, day = owner[keep], day[keep]
    dropped_now = np.isfinite(first_drop)

    # The campaign: an extra order (active customers), a comeback (customers who left).
    extra = active & (rng.random(n) < lift)
    came_back = ~active & (rng.random(n) < revive)
    caused = np.flatnonzero(extra | came_back)
    owner = np.concatenate([owner, caused])
    day = np.concatenate([day, rng.random(len(caused)) * days])
    dropped_now &= ~came_back

    # Lines of the customers' orders, then guest orders.
    n_orders = len(owner)
    n_guest = rng.binomial(n_orders, GUEST_ORDER_SHARE / (1 - GUEST_ORDER_SHARE))
    order_type = np.concatenate([type_idx[owner], np.full(n_guest, 1)])
    order_day = np.concatenate([day, rng.random(n_guest) * days])
    order_spend = np.concatenate([state["spend_multiplier"].to_numpy()[owner], np.ones(n_guest)])
    order_discount = np.concatenate([discount[owner], np.zeros(n_guest)])
    order_customer = np.concatenate(
        [state["customer_id"].to_numpy(object)[owner], np.full(n_guest, None, object)]
    )
    first_invoice = FIRST_INVOICE + 50_000_000 + int(rng.integers(0, 40_000_000))
    invoice = np.array([str(first_invoice + i) for i in range(n_orders + n_guest)], object)
    lines_per = 1 + rng.poisson(
        np.array([t.lines_per_order for t in CUSTOMER_TYPES])[order_type] - 1
    )
    line_order = np.repeat(np.arange(n_orders + n_guest), lines_per)
    u = rng.random(len(line_order))
    product = np.empty(len(line_order), np.int64)
    for t in range(len(CUSTOMER_TYPES)):
        mask = order_type[line_order] == t
        product[mask] = np.searchsorted(cdfs[t, -1], u[mask]).clip(0, cdfs.shape[2] - 1)
    years = ((start.date() - origin).days + order_day[line_order]) / 365.25
    on_sale = (
        rng.random(len(line_order))
        < np.array([t.discount_share for t in CUSTOMER_TYPES])[order_type[line_order]]
    )
    price = np.round(
        catalogue["list_price"][product]
        * np.where(on_sale, 0.7, 1.0)
        * (1.0 + 0.03 * years)
        * (1.0 - order_discount[line_order]),
        2,
    )
    quantity = 1 + rng.poisson(1.5 * order_spend[line_order])
    at = pd.Timestamp(start) + pd.to_timedelta(
        np.floor(order_day) + (8 + 13 * rng.beta(2, 2, len(order_day))) / 24, unit="D"
    )
    lines = pa.table(
        {
            "invoice_id": pa.array(invoice[line_order], pa.string()),
            "sku": pa.array(catalogue["sku"][product], pa.string()),
            "description": pa.array(catalogue["description"][product], pa.string()),
            "quantity": pa.array(quantity, pa.int64()),
            "unit_price": pa.array(price, pa.float64()),
            "invoiced_at": pa.array(at[line_order].to_numpy().astype("datetime64[s]")),
            "customer_id": pa.array(order_customer[line_order], pa.string()),
            "country": pa.array(np.full(len(line_order), "United Kingdom", object), pa.string()),
        }
    )
    part = shop / "order_lines" / f"window-{start:%Y%m%d}.parquet"
    pq.write_table(lines.sort_by("invoiced_at"), part)

    # What the activation tool saw of the treated group.
    order_revenue = pd.Series(price * quantity).groupby(line_order).sum()
    events = _activation_events(
        rng,
        treated,
        state,
        owner,
        at[:n_orders],
        order_revenue.iloc[:n_orders].to_numpy(),
        unsubscribe,
        campaign_id,
        start,
    )
    outcomes_dir.mkdir(parents=True, exist_ok=True)
    outcomes_file = outcomes_dir / f"{campaign_id}.csv"
    events.to_csv(outcomes_file, index=False)

    # The truth about this campaign, for benchmarks only: each action's expected incremental
    # revenue on each campaign customer (no margin, no cost), next to what they got.
    actions = sorted({a for a, _ in TRUE_EFFECTS})
    truth_effects = expected_incremental_profit(
        shop, assignments["customer_id"], actions, start, days, 1.0, dict.fromkeys(actions, 0.0)
    ).add_prefix("expected_incremental_revenue_")
    truth_dir = shop / "latent" / "campaigns"
    truth_dir.mkdir(parents=True, exist_ok=True)
    pd.concat(
        [assignments[["campaign_id", "customer_key", "action", "group_name"]], truth_effects],
        axis=1,
    ).to_parquet(truth_dir / f"{campaign_id}.parquet", index=False)

    # The latent state moves on: dropouts in the window, customers won back.
    truth = pq.read_table(shop / "latent" / "customer_truth.parquet").to_pandas()
    dropped_at = pd.Series(
        pd.Timestamp(start) + pd.to_timedelta(np.where(dropped_now, first_drop, 0), unit="D"),
        index=truth.index,
    ).dt.floor("s")

    # Who of those who stopped buying moved to the B2B account, as its team reports at the
    # window's end: the window's moves, and with its first file the year's before.
    end = start + timedelta(days=days)
    moved = moved_to_b2b(seed, truth["customer_id"])
    reported = dropped_now & moved
    last_order = dropped_at.where(reported)
    if not manifest.get("windows"):
        before = truth["dropped_out_at"]
        backlog = (
            moved
            & (before >= pd.Timestamp(start) - pd.Timedelta(days=B2B_BACKLOG_DAYS)).to_numpy()
            & (before < pd.Timestamp(start)).to_numpy()
        )
        last_order = last_order.where(~backlog, before)
        reported |= backlog
    corrections = b2b_corrections(
        truth["customer_id"].to_numpy(object)[reported],
        pd.DatetimeIndex(last_order[reported]),
        end,
    )
    corrections_file = None
    if len(corrections):
        corrections_dir = corrections_dir or outcomes_dir.parent / "label_feedback"
        corrections_dir.mkdir(parents=True, exist_ok=True)
        corrections_file = corrections_dir / f"{campaign_id}.csv"
        corrections.to_csv(corrections_file, index=False)
    truth["dropped_out_at"] = truth["dropped_out_at"].where(~came_back, pd.NaT)
    truth["dropped_out_at"] = truth["dropped_out_at"].where(~dropped_now, dropped_at)
    truth["purchases"] = truth["purchases"] + np.bincount(owner, minlength=n)
    pq.write_table(
        pa.Table.from_pandas(
            truth,
            schema=pq.read_schema(shop / "latent" / "customer_truth.parquet"),
            preserve_index=False,
        ),
        shop / "latent" / "customer_truth.parquet",
    )
    manifest["end"] = max(manifest["end"], (end - timedelta(days=1)).date().isoformat())
    manifest.setdefault("windows", {})[campaign_id] = f"{start:%Y-%m-%d}/{end:%Y-%m-%d}"
    summary = WindowSummary(
        campaign_id,
        start,
        end,
        n_orders,
        lines.num_rows,
        int(extra.sum()),
        int(came_back.sum()),
        int(dropped_now.sum()),
        len(events),
        outcomes_file,
        len(corrections),
        corrections_file,
    )
    # What a rerun of the loop needs once the market has moved on (``played``).
    manifest.setdefault("window_summaries", {})[campaign_id] = {
        "start": start.isoformat(),
        "end": end.isoformat(),
        "orders": int(summary.orders),
        "order_lines": int(summary.order_lines),
        "incremental_orders": int(summary.incremental_orders),
        "revived": int(summary.revived),
        "dropped_out": int(summary.dropped_out),
        "events": int(summary.events),
        "outcomes_file": str(outcomes_file),
        "corrections": len(corrections),
        "corrections_file": str(corrections_file) if corrections_file else None,
    }
    (shop / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return summary


def _activation_events(
    rng: np.random.Generator,
    treated: pd.DataFrame,
    state: pd.DataFrame,
    order_owner: np.ndarray,
    order_at: pd.DatetimeIndex,
    order_revenue: np.ndarray,
    unsubscribe: np.ndarray,
    campaign_id: str,
    start: datetime,
) -> pd.DataFrame:
    index = pd.Index(state["customer_id"])
    rows = []
    first_order: dict[int, tuple[pd.Timestamp, float]] = {}
    for o, at, revenue in zip(order_owner, order_at, order_revenue, strict=True):
        if o not in first_order or at < first_order[o][0]:
            first_order[int(o)] = (at, float(revenue))
    for customer_id, row in treated.iterrows():
        i = index.get_loc(customer_id)
        key = row["customer_key"]
        if rng.random() >= P_DELIVERED:
            continue
        sent = pd.Timestamp(start) + pd.Timedelta(hours=float(rng.uniform(6, 10)))
        rows.append((campaign_id, key, "delivered", sent, None))
        if rng.random() < unsubscribe[i]:
            rows.append((campaign_id, key, "unsubscribed", sent + pd.Timedelta(hours=2), None))
            continue
        opened = rng.random() < P_OPENED
        if opened:
            rows.append((campaign_id, key, "opened", sent + pd.Timedelta(hours=1), None))
        clicked = opened and rng.random() < P_CLICKED
        if clicked:
            rows.append((campaign_id, key, "clicked", sent + pd.Timedelta(hours=1.5), None))
        bought = first_order.get(i)
        if clicked and bought and bought[0] > sent:
            rows.append((campaign_id, key, "converted", bought[0], round(bought[1], 2)))
    events = pd.DataFrame(
        rows, columns=["campaign_id", "customer_key", "event", "occurred_at", "revenue"]
    )
    events["occurred_at"] = pd.to_datetime(events["occurred_at"]).dt.strftime("%Y-%m-%d %H:%M:%S")
    return events
