"""Plausible ranges of what a shop sends: ingest quarantines rows outside them, GX checks the rest.

Parsing catches text in a number; these catch numbers no shop sends, as a broken export does:
999999999999 units, a negative price on a product, an invoice dated 2099 or 1900. The bounds
come from the settings (each overridable by its environment variable); the defaults hold all of
UCI Online Retail (quantities to ±80,995, unit prices from -11,062.06 on bad-debt adjustments
to 38,970 on a manual line, zero on free items) and the demo shop, with room to spare.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime, timedelta

from valueloop.config import Settings, env_var
from valueloop.quality.checks import sql_literal

# Every quarantine reason of a plausibility rule contains this; the raw checkpoint counts them.
IMPLAUSIBLE = "outside the plausible range"
RATING_RANGE = (1, 5)  # stars, as the raw contract and the dbt staging tests declare them


@dataclass(frozen=True)
class PlausibleRange:
    """A column's plausible values on the rows a predicate selects (null values pass)."""

    column: str
    low: str  # SQL expression of the lowest plausible value
    high: str  # and of the highest
    shown: str  # the range as people read it, e.g. [-100000, 100000]
    setting_names: tuple[str, ...]  # the settings that move it (in `Settings`)
    note: str = ""  # a rule beyond the numbers, e.g. "negative only on non-product codes"
    rows: str = "true"  # SQL predicate over the entity's typed columns: where the range holds
    rows_shown: str = ""  # those rows in words, e.g. " on a product line"

    def outside(self) -> str:
        """SQL predicate: the row's value lies outside the range."""
        return f"(({self.rows}) and {self.column} not between {self.low} and {self.high})"

    def reason(self, raw_value: str) -> str:
        """SQL expression naming the column, the value as sent, the range and its settings."""
        tail = f" {IMPLAUSIBLE} {self.shown}{self.rows_shown} ({moved_by([self])})"
        return f"{sql_literal(self.column + ': ')} || {raw_value} || {sql_literal(tail)}"


def moved_by(ranges: list[PlausibleRange]) -> str:
    """What moves these ranges: their settings' environment variables, then their notes."""
    variables = ", ".join(dict.fromkeys(env_var(s) for r in ranges for s in r.setting_names))
    notes = dict.fromkeys(r.note for r in ranges if r.note)
    return "; ".join(part for part in (variables, *notes) if part)


def non_product_codes(settings: Settings) -> list[str]:
    """The one list of non-product stock codes (postage, adjustments, fees): the dbt seed."""
    with (settings.dbt_project_dir / "seeds" / "non_product_codes.csv").open() as handle:
        return [row["stock_code"].upper() for row in csv.DictReader(handle)]


def product_line(settings: Settings) -> str:
    """SQL predicate over order lines: the line sells a product (its code is not a fee etc.)."""
    codes = ", ".join(sql_literal(c) for c in non_product_codes(settings))
    return f"coalesce(upper(sku) not in ({codes}), false)"


def plausible_ranges(settings: Settings, now: datetime) -> dict[str, tuple[PlausibleRange, ...]]:
    """Each raw entity's plausible ranges; dates may lie at most a little after ``now``."""
    quantity, price = settings.plausible_quantity_max, settings.plausible_price_max
    opened = settings.shop_opened_on.isoformat()
    latest = (now + timedelta(days=settings.plausible_future_days)).replace(microsecond=0)
    products = product_line(settings)

    def dated(column: str) -> PlausibleRange:
        return PlausibleRange(
            column,
            f"{sql_literal(opened)}::timestamp",
            f"{sql_literal(latest.isoformat(sep=' '))}::timestamp",
            f"[{opened}, {latest.isoformat(sep=' ')}]",
            ("shop_opened_on", "plausible_future_days"),
        )

    def numeric(column: str, low: int, high: int, *setting_names: str, **kw) -> PlausibleRange:
        return PlausibleRange(column, str(low), str(high), f"[{low}, {high}]", setting_names, **kw)

    return {
        "order_lines": (
            numeric("quantity", -quantity, quantity, "plausible_quantity_max"),
            # Bad debt, fees and adjustments carry codes of their own (the dbt seed); a product
            # is never sold at a negative price (a return negates the quantity instead).
            numeric(
                "unit_price",
                0,
                price,
                "plausible_price_max",
                note="negative only on non-product codes",
                rows=products,
                rows_shown=" on a product line",
            ),
            numeric("unit_price", -price, price, "plausible_price_max", rows=f"not {products}"),
            dated("invoiced_at"),
        ),
        "customers": (dated("signed_up_at"),),
        "products": (numeric("list_price", 0, price, "plausible_price_max"),),
        "reviews": (
            numeric("rating", *RATING_RANGE, note="stars, by the raw contract"),
            dated("reviewed_at"),
        ),
        "campaign_outcomes": (
            numeric("revenue", 0, price, "plausible_price_max", note="refunds are order lines"),
            dated("occurred_at"),
        ),
        "label_feedback": (dated("valid_from"), dated("submitted_at")),
    }
