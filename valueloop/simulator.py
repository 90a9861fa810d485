"""The demo shop simulator: a seeded, realistic online gift shop.

Behaviour follows the Buy-Till-You-Die family. Every customer has a latent type, drawn once;
the type sets the distributions of:

* the purchase rate (Gamma across customers, Poisson in time, thinned by seasonality and, for
  customers drifting away, by a decaying interest);
* dropout (after each purchase the customer leaves with a Beta-distributed probability, as in
  BG/NBD);
* spend (a Gamma multiplier on quantities), price sensitivity and category taste;
* cancellations, returns, and how happy their reviews sound.

Customers are generated in chunks with independent, seed-derived random streams, so output is
deterministic for a seed and memory stays bounded at any size. The latent truth is written to
``latent/`` for evaluation only and is never ingested.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHUNK_CUSTOMERS = 50_000
DAY_SECONDS = 86_400
FIRST_CUSTOMER_ID = 100_000
FIRST_INVOICE = 1_000_000


@dataclass(frozen=True)
class CustomerType:
    name: str
    weight: float
    orders_per_year: float  # mean of the Gamma over customers
    rate_shape: float
    dropout_beta: tuple[float, float]  # Beta(a, b) of the per-purchase dropout probability
    spend: float  # mean of the Gamma quantity multiplier
    lines_per_order: float
    price_taste: float  # >0 prefers dear products, <0 cheap ones
    discount_share: float  # share of lines bought on sale
    cancel_rate: float
    return_rate: float
    review_rate: float
    mood: float  # mean review stars before the experience
    interest_half_life_days: float | None = None  # drifting away: interest decays
    channels: tuple[float, ...] = (0.35, 0.2, 0.15, 0.2, 0.1)  # weights over CHANNELS


CUSTOMER_TYPES: tuple[CustomerType, ...] = (
    CustomerType(
        "loyal_high_value",
        0.08,
        12.0,
        4.0,
        (1.0, 60.0),
        2.4,
        5.0,
        0.6,
        0.05,
        0.01,
        0.02,
        0.12,
        4.6,
        channels=(0.45, 0.1, 0.05, 0.3, 0.1),
    ),
    CustomerType(
        "regular", 0.30, 4.5, 3.0, (1.5, 25.0), 1.0, 3.5, 0.0, 0.15, 0.02, 0.05, 0.08, 4.1
    ),
    CustomerType(
        "bargain_hunter",
        0.22,
        5.0,
        2.5,
        (2.0, 18.0),
        0.7,
        3.0,
        -1.0,
        0.7,
        0.04,
        0.09,
        0.06,
        3.7,
        channels=(0.15, 0.35, 0.3, 0.1, 0.1),
    ),
    CustomerType(
        "one_off",
        0.28,
        1.0,
        1.5,
        (6.0, 3.0),
        0.9,
        2.0,
        0.0,
        0.3,
        0.03,
        0.06,
        0.04,
        3.8,
        channels=(0.2, 0.35, 0.3, 0.05, 0.1),
    ),
    CustomerType(
        "drifting_away",
        0.12,
        8.0,
        3.0,
        (2.0, 10.0),
        1.1,
        3.0,
        0.2,
        0.2,
        0.03,
        0.12,
        0.10,
        3.0,
        interest_half_life_days=120.0,
    ),
)
CHANNELS = ("organic", "paid_search", "social", "email", "referral")
COUNTRIES = (
    "United Kingdom",
    "Germany",
    "France",
    "Netherlands",
    "Ireland",
    "Spain",
    "Belgium",
    "Switzerland",
    "Portugal",
    "Norway",
)
COUNTRY_WEIGHTS = (0.72, 0.06, 0.06, 0.03, 0.03, 0.03, 0.02, 0.02, 0.02, 0.01)
HOME_COUNTRY = 0

CATEGORIES = {
    # category: (nouns, median price)
    "home decor": (
        ("HEART T-LIGHT HOLDER", "HANGING ORNAMENT", "PHOTO FRAME", "WALL SIGN", "DOORSTOP"),
        4.5,
    ),
    "kitchen": (("CAKE STAND", "TEA SET", "BAKING SET", "JAM JAR", "LUNCH BOX"), 6.0),
    "stationery": (("NOTEBOOK", "GIFT WRAP", "GREETING CARD", "PENCIL SET", "STICKER SHEET"), 1.5),
    "toys": (("SPACEBOY DOLL", "SKIPPING ROPE", "JIGSAW", "TOY CAR", "PLAYHOUSE"), 3.5),
    "garden": (("PLANT POT", "BIRD FEEDER", "WATERING CAN", "GARDEN KNEELER", "SEED BOX"), 7.0),
    "lighting": (("LANTERN", "STRING LIGHTS", "NIGHT LIGHT", "CANDLE HOLDER", "LAMP"), 9.0),
    "textiles": (("CUSHION COVER", "TEA TOWEL", "APRON", "HOT WATER BOTTLE", "TOTE BAG"), 5.0),
    "seasonal": (
        ("CHRISTMAS BAUBLE", "ADVENT CALENDAR", "EASTER EGG", "PARTY BUNTING", "GIFT BOX"),
        3.0,
    ),
}
ADJECTIVES = (
    "WHITE",
    "RED",
    "VINTAGE",
    "RETROSPOT",
    "PINK",
    "BLUE",
    "WOODEN",
    "CERAMIC",
    "ENAMEL",
    "GLASS",
    "REGENCY",
    "PAISLEY",
    "SPOTTY",
    "FLORAL",
    "ZINC",
)
FIRST_NAMES = (
    "Alice",
    "Ben",
    "Chloe",
    "David",
    "Emma",
    "Farah",
    "George",
    "Hana",
    "Isaac",
    "Julia",
    "Kofi",
    "Lena",
    "Mateo",
    "Nina",
    "Oscar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tariq",
    "Uma",
    "Victor",
    "Wen",
    "Yusuf",
    "Zoe",
)
LAST_NAMES = (
    "Smith",
    "Jones",
    "Garcia",
    "Müller",
    "Dubois",
    "Rossi",
    "Kowalski",
    "Nguyen",
    "Okafor",
    "Patel",
    "Silva",
    "Jensen",
    "Murphy",
    "Novak",
    "Haddad",
    "Kim",
)
REVIEW_TEXT = {
    1: (
        "Really disappointed with the {noun}: it arrived broken and support never answered.",
        "Terrible {noun}, nothing like the photos. I returned it.",
        "The {noun} fell apart within a week. Would not buy again.",
    ),
    2: (
        "The {noun} looks cheaper than expected and delivery was slow.",
        "Not great: the {noun} had scratches and the colour was off.",
        "Poor value, the {noun} is smaller than described.",
    ),
    3: (
        "The {noun} is okay, does the job.",
        "Average {noun}; fine for the price.",
        "Decent {noun} but packaging could be better.",
    ),
    4: (
        "Nice {noun}, good quality and quick delivery.",
        "Pretty {noun}, my friend loved it as a gift.",
        "Good {noun}, would order again.",
    ),
    5: (
        "Absolutely love this {noun}! Beautiful and well made.",
        "Perfect {noun}, fast shipping and lovely wrapping. My favourite shop.",
        "Excellent {noun}, I have bought several for friends.",
    ),
}
NON_PRODUCT_CODES = {
    "POST": ("POSTAGE", 18.0),
    "M": ("Manual", None),
    "DOT": ("DOTCOM POSTAGE", 6.0),
}


@dataclass(frozen=True)
class SimulationConfig:
    customers: int = 10_000
    seed: int = 42
    start: date = date(2023, 1, 1)
    end: date = date(2025, 12, 31)
    products: int = 400
    guest_order_share: float = 0.12
    chunk_customers: int = CHUNK_CUSTOMERS


@dataclass(frozen=True)
class SimulationSummary:
    out_dir: str
    customers: int
    products: int
    orders: int
    order_lines: int
    reviews: int

    def __str__(self) -> str:
        return (
            f"demo shop in {self.out_dir}: {self.customers:,} customers, {self.products:,} "
            f"products, {self.orders:,} orders, {self.order_lines:,} order lines, "
            f"{self.reviews:,} reviews"
        )


# --------------------------------------------------------------------------- products


def make_products(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    names = list(CATEGORIES)
    category_idx = rng.integers(0, len(names), n)
    noun_idx = rng.integers(0, 5, n)
    adjective_idx = rng.integers(0, len(ADJECTIVES), n)
    medians = np.array([CATEGORIES[c][1] for c in names])[category_idx]
    prices = np.round(medians * rng.lognormal(0.0, 0.45, n), 2).clip(0.19)
    descriptions = np.array(
        [
            f"{ADJECTIVES[a]} {CATEGORIES[names[c]][0][k]}"
            for a, c, k in zip(adjective_idx, category_idx, noun_idx, strict=True)
        ],
        dtype=object,
    )
    return {
        "sku": np.array([f"{20000 + i}" for i in range(n)], dtype=object),
        "description": descriptions,
        "category": np.array(names, dtype=object)[category_idx],
        "category_idx": category_idx,
        "list_price": prices,
        "noun": np.array(
            [CATEGORIES[names[c]][0][k] for c, k in zip(category_idx, noun_idx, strict=True)],
            dtype=object,
        ),
    }


def _product_choice_cdfs(products: dict[str, np.ndarray]) -> np.ndarray:
    """cdf[type, category or 'any', product]: where each type shops, by price taste."""
    n_categories = len(CATEGORIES)
    log_price = np.log(products["list_price"])
    cdfs = np.zeros((len(CUSTOMER_TYPES), n_categories + 1, len(log_price)))
    for t, ctype in enumerate(CUSTOMER_TYPES):
        base = np.exp(ctype.price_taste * (log_price - log_price.mean()))
        for c in range(n_categories + 1):
            weights = base if c == n_categories else base * (products["category_idx"] == c)
            cdfs[t, c] = np.cumsum(weights) / weights.sum()
    return cdfs


# --------------------------------------------------------------------------- behaviour


def seasonality(day_of_year: np.ndarray) -> np.ndarray:
    """Purchase intensity over the year: a spring-summer wave and a Christmas peak."""
    wave = 0.2 * np.sin(2 * np.pi * (day_of_year - 80) / 365.25)
    christmas = 0.8 * np.exp(-(((day_of_year - 335) / 22.0) ** 2))
    return 1.0 + wave + christmas


SEASON_MAX = 2.0


def _signup_days(rng: np.random.Generator, n: int, span_days: float) -> np.ndarray:
    """Signups grow over time: density proportional to 1 + g x on [0, 1)."""
    g = 2.0
    u = rng.random(n)
    x = (-1.0 + np.sqrt(1.0 + u * g * (2.0 + g))) / g
    return x * span_days * 0.97


def _day_of_year(start: date, days: np.ndarray) -> np.ndarray:
    return (days + start.timetuple().tm_yday - 1) % 365.25


def _purchase_days(
    rng: np.random.Generator,
    start: date,
    span_days: float,
    signup: np.ndarray,
    rate_per_year: np.ndarray,
    dropout_p: np.ndarray,
    half_life: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Purchase days per customer: the first at signup, repeats until the customer drops out.

    Returns (customer index, purchase day, dropout day or NaN if still active at the end).
    """
    n = len(signup)
    window = span_days - signup
    candidates = rng.poisson(rate_per_year * SEASON_MAX * window / 365.25)
    owner = np.repeat(np.arange(n), candidates)
    day = signup[owner] + rng.random(len(owner)) * window[owner]
    keep = rng.random(len(owner)) * SEASON_MAX < seasonality(_day_of_year(start, day))
    decaying = np.isfinite(half_life[owner])
    age = day - signup[owner]
    interest = np.where(decaying, 0.5 ** (age / np.where(decaying, half_life[owner], 1.0)), 1.0)
    keep &= rng.random(len(owner)) < interest
    owner, day = owner[keep], day[keep]
    order = np.lexsort((day, owner))
    owner, day = owner[order], day[order]

    # After each purchase the customer drops out with probability p (BG/NBD): the number of
    # purchases they make at most is geometric, the first one (at signup) included.
    max_purchases = rng.geometric(dropout_p)
    first_of_owner = np.searchsorted(owner, np.arange(n))
    repeat_rank = np.arange(len(owner)) - first_of_owner[owner]
    keep = repeat_rank < max_purchases[owner] - 1
    owner, day = owner[keep], day[keep]
    repeats = np.bincount(owner, minlength=n)
    dropped = repeats == max_purchases - 1
    last_day = np.where(repeats > 0, 0.0, signup)
    np.maximum.at(last_day, owner, day)
    dropout_day = np.where(dropped, last_day, np.nan)

    all_owner = np.concatenate([np.arange(n), owner])
    all_day = np.concatenate([signup, day])
    order = np.lexsort((all_day, all_owner))
    return all_owner[order], all_day[order], dropout_day


def _to_timestamps(start: date, days: np.ndarray) -> np.ndarray:
    origin = np.datetime64(start, "s")
    return origin + (days * DAY_SECONDS).astype("int64").astype("timedelta64[s]")


def _shop_hours(rng: np.random.Generator, days: np.ndarray) -> np.ndarray:
    """Move each event to a plausible time of day (8:00 to 21:00) on its day."""
    return np.floor(days) + (8.0 + 13.0 * rng.beta(2.0, 2.0, len(days))) / 24.0


@dataclass
class _Chunk:
    customers: pa.Table
    latent: pa.Table
    order_lines: pa.Table
    reviews: pa.Table
    orders: int


def _simulate_chunk(
    cfg: SimulationConfig,
    rng: np.random.Generator,
    first_index: int,
    first_invoice: int,
    n: int,
    products: dict[str, np.ndarray],
    cdfs: np.ndarray,
) -> _Chunk:
    span = float((cfg.end - cfg.start).days)
    type_idx = rng.choice(len(CUSTOMER_TYPES), n, p=[t.weight for t in CUSTOMER_TYPES])
    pick = {
        f: np.array([getattr(t, f) for t in CUSTOMER_TYPES])[type_idx]
        for f in (
            "orders_per_year",
            "rate_shape",
            "spend",
            "lines_per_order",
            "discount_share",
            "cancel_rate",
            "return_rate",
            "review_rate",
            "mood",
        )
    }
    beta_a = np.array([t.dropout_beta[0] for t in CUSTOMER_TYPES])[type_idx]
    beta_b = np.array([t.dropout_beta[1] for t in CUSTOMER_TYPES])[type_idx]
    half_life = np.array([t.interest_half_life_days or np.inf for t in CUSTOMER_TYPES])[type_idx]

    rate = rng.gamma(pick["rate_shape"], pick["orders_per_year"] / pick["rate_shape"])
    dropout_p = rng.beta(beta_a, beta_b).clip(1e-3, 1.0)
    spend = rng.gamma(4.0, pick["spend"] / 4.0)
    favourite = rng.integers(0, len(CATEGORIES), n)
    country_idx = rng.choice(len(COUNTRIES), n, p=COUNTRY_WEIGHTS)
    channel_u = rng.random(n)
    channel_cdf = np.cumsum([t.channels for t in CUSTOMER_TYPES], axis=1)
    channel_idx = (
        (channel_u[:, None] > channel_cdf[type_idx]).sum(axis=1).clip(0, len(CHANNELS) - 1)
    )
    signup = _shop_hours(rng, _signup_days(rng, n, span))

    owner, day, dropout_day = _purchase_days(
        rng, cfg.start, span, signup, rate, dropout_p, half_life
    )
    day = np.where(day == signup[owner], day, np.maximum(_shop_hours(rng, day), signup[owner]))
    ids = np.array([str(FIRST_CUSTOMER_ID + first_index + i) for i in range(n)], dtype=object)

    # Guest orders: shoppers without an account, kept apart from customers downstream.
    n_guest = rng.binomial(len(owner), cfg.guest_order_share)
    guest_day = _shop_hours(rng, rng.random(n_guest) * span)
    guest_type = np.full(n_guest, 1)  # guests shop like regulars
    n_orders = len(owner) + n_guest
    order_type = np.concatenate([type_idx[owner], guest_type])
    order_day = np.concatenate([day, guest_day])
    order_owner = np.concatenate([owner, np.full(n_guest, -1)])
    order_spend = np.concatenate([spend[owner], np.ones(n_guest)])
    order_country = np.concatenate(
        [country_idx[owner], rng.choice(len(COUNTRIES), n_guest, p=COUNTRY_WEIGHTS)]
    )
    order_favourite = np.concatenate([favourite[owner], rng.integers(0, len(CATEGORIES), n_guest)])
    invoice_no = first_invoice + np.arange(n_orders)

    # Lines: a Poisson basket; half the lines from the customer's favourite category.
    lines_per_order = 1 + rng.poisson(
        np.array([t.lines_per_order for t in CUSTOMER_TYPES])[order_type] - 1
    )
    line_order = np.repeat(np.arange(n_orders), lines_per_order)
    line_type = order_type[line_order]
    line_category = np.where(
        rng.random(len(line_order)) < 0.5, order_favourite[line_order], len(CATEGORIES)
    )
    u = rng.random(len(line_order))
    product = np.empty(len(line_order), dtype=np.int64)
    for t in range(len(CUSTOMER_TYPES)):
        for c in range(len(CATEGORIES) + 1):
            mask = (line_type == t) & (line_category == c)
            if mask.any():
                product[mask] = np.searchsorted(cdfs[t, c], u[mask]).clip(0, len(cdfs[t, c]) - 1)
    quantity = 1 + rng.poisson(1.5 * order_spend[line_order])
    on_sale = (
        rng.random(len(line_order))
        < np.array([t.discount_share for t in CUSTOMER_TYPES])[line_type]
    )
    years = order_day[line_order] / 365.25
    unit_price = np.round(
        products["list_price"][product] * np.where(on_sale, 0.7, 1.0) * (1.0 + 0.03 * years), 2
    )

    # Non-product lines: postage abroad, rare manual adjustments.
    abroad = np.flatnonzero(order_country != HOME_COUNTRY)
    manual = np.flatnonzero(rng.random(n_orders) < 0.002)
    extra_order = np.concatenate([abroad, manual])
    extra_sku = np.array(["POST"] * len(abroad) + ["M"] * len(manual), dtype=object)
    extra_price = np.concatenate(
        [np.full(len(abroad), 18.0), np.round(rng.gamma(2.0, 10.0, len(manual)), 2)]
    )

    sku = np.concatenate([products["sku"][product], extra_sku])
    description = np.concatenate(
        [
            products["description"][product],
            np.array([NON_PRODUCT_CODES[s][0] for s in extra_sku], dtype=object),
        ]
    )
    all_line_order = np.concatenate([line_order, extra_order])
    all_quantity = np.concatenate([quantity, np.ones(len(extra_order), dtype=np.int64)])
    all_price = np.concatenate([unit_price, extra_price])
    line_product = np.concatenate([product, np.full(len(extra_order), -1)])

    # Cancellations (same day, whole order) and returns (days later, one line each).
    cancel_rate = np.array([t.cancel_rate for t in CUSTOMER_TYPES])[order_type]
    cancelled = rng.random(n_orders) < cancel_rate
    is_cancelled_line = cancelled[all_line_order]
    return_rate = np.array([t.return_rate for t in CUSTOMER_TYPES])[order_type[all_line_order]]
    return_delay = 3.0 + rng.random(len(all_line_order)) * 27.0
    returned = (
        (rng.random(len(all_line_order)) < return_rate)
        & ~is_cancelled_line
        & (line_product >= 0)
        & (order_day[all_line_order] + return_delay < span)
    )

    base_invoice = invoice_no[all_line_order].astype(str).astype(object)
    cancel_delay = rng.random(len(all_line_order)) * 0.08
    parts = [
        (base_invoice, all_quantity, order_day[all_line_order], np.ones(len(base_invoice), bool)),
        (
            "C" + base_invoice[is_cancelled_line],
            -all_quantity[is_cancelled_line],
            (order_day[all_line_order] + cancel_delay)[is_cancelled_line],
            is_cancelled_line,
        ),
        (
            "R" + base_invoice[returned],
            -all_quantity[returned],
            (order_day[all_line_order] + return_delay)[returned],
            returned,
        ),
    ]
    invoice = np.concatenate([p[0] for p in parts])
    signed_qty = np.concatenate([p[1] for p in parts])
    event_day = np.concatenate([p[2] for p in parts])
    source_line = np.concatenate([np.flatnonzero(p[3]) for p in parts])
    owner_of_line = order_owner[all_line_order][source_line]
    customer_col = np.where(owner_of_line >= 0, ids[owner_of_line.clip(0)], None)
    event_order = np.argsort(event_day, kind="stable")
    order_lines = pa.table(
        {
            "invoice_id": pa.array(invoice[event_order], pa.string()),
            "sku": pa.array(sku[source_line][event_order], pa.string()),
            "description": pa.array(description[source_line][event_order], pa.string()),
            "quantity": pa.array(signed_qty[event_order], pa.int64()),
            "unit_price": pa.array(all_price[source_line][event_order], pa.float64()),
            "invoiced_at": pa.array(_to_timestamps(cfg.start, event_day[event_order])),
            "customer_id": pa.array(customer_col[event_order], pa.string()),
            "country": pa.array(
                np.array(COUNTRIES, dtype=object)[order_country[all_line_order][source_line]][
                    event_order
                ],
                pa.string(),
            ),
        }
    )

    # Reviews: sentiment follows the customer's mood and whether the line came back.
    reviewable = np.flatnonzero(
        (line_product >= 0) & (order_owner[all_line_order] >= 0) & ~is_cancelled_line
    )
    review_rate = np.array([t.review_rate for t in CUSTOMER_TYPES])[
        order_type[all_line_order[reviewable]]
    ]
    review_delay = 2.0 + rng.random(len(reviewable)) * 18.0
    chosen = (rng.random(len(reviewable)) < review_rate) & (
        order_day[all_line_order[reviewable]] + review_delay < span
    )
    reviewed = reviewable[chosen]
    mood = np.array([t.mood for t in CUSTOMER_TYPES])[order_type[all_line_order[reviewed]]]
    stars = np.rint(mood - 2.0 * returned[reviewed] + rng.normal(0.0, 0.7, len(reviewed)))
    stars = stars.clip(1, 5).astype(np.int64)
    template = rng.integers(0, 3, len(reviewed))
    nouns = products["noun"][line_product[reviewed]]
    text = np.array(
        [
            REVIEW_TEXT[s][k].format(noun=noun.lower())
            for s, k, noun in zip(stars, template, nouns, strict=True)
        ],
        dtype=object,
    )
    review_owner = order_owner[all_line_order[reviewed]]
    reviews = pa.table(
        {
            "review_id": pa.array(
                [f"RV{first_index:08d}-{i:07d}" for i in range(len(reviewed))], pa.string()
            ),
            "customer_id": pa.array(ids[review_owner], pa.string()),
            "sku": pa.array(sku[reviewed], pa.string()),
            "rating": pa.array(stars, pa.int64()),
            "review_text": pa.array(text, pa.string()),
            "reviewed_at": pa.array(
                _to_timestamps(
                    cfg.start, order_day[all_line_order[reviewed]] + review_delay[chosen]
                )
            ),
        }
    )

    first_names = np.array(FIRST_NAMES, dtype=object)[rng.integers(0, len(FIRST_NAMES), n)]
    last_names = np.array(LAST_NAMES, dtype=object)[rng.integers(0, len(LAST_NAMES), n)]
    customers = pa.table(
        {
            "customer_id": pa.array(ids, pa.string()),
            "signed_up_at": pa.array(_to_timestamps(cfg.start, signup)),
            "country": pa.array(np.array(COUNTRIES, dtype=object)[country_idx], pa.string()),
            "acquisition_channel": pa.array(
                np.array(CHANNELS, dtype=object)[channel_idx], pa.string()
            ),
            "email": pa.array(
                [
                    f"{f.lower()}.{ln.lower()}.{i}@example.com"
                    for f, ln, i in zip(first_names, last_names, ids, strict=True)
                ],
                pa.string(),
            ),
            "full_name": pa.array(first_names + " " + last_names, pa.string()),
        }
    )
    purchases = np.bincount(owner, minlength=n)
    dropout_at = np.where(np.isnan(dropout_day), None, dropout_day)
    latent = pa.table(
        {
            "customer_id": pa.array(ids, pa.string()),
            "customer_type": pa.array(
                np.array([t.name for t in CUSTOMER_TYPES], dtype=object)[type_idx], pa.string()
            ),
            "orders_per_year": pa.array(rate, pa.float64()),
            "dropout_probability": pa.array(dropout_p, pa.float64()),
            "spend_multiplier": pa.array(spend, pa.float64()),
            "favourite_category": pa.array(
                np.array(list(CATEGORIES), dtype=object)[favourite], pa.string()
            ),
            "purchases": pa.array(purchases, pa.int64()),
            "dropped_out_at": pa.array(
                [
                    None if d is None else _to_timestamps(cfg.start, np.array([d]))[0].item()
                    for d in dropout_at
                ],
                pa.timestamp("s"),
            ),
        }
    )
    return _Chunk(customers, latent, order_lines, reviews, n_orders)


def generate(out_dir: Path, cfg: SimulationConfig) -> SimulationSummary:
    """Write the demo shop to ``out_dir`` (replacing what a previous run wrote there)."""
    if cfg.customers < 1:
        raise ValueError("the demo shop needs at least one customer")
    if cfg.end <= cfg.start:
        raise ValueError(f"end ({cfg.end}) must be after start ({cfg.start})")
    for stale in ("order_lines", "latent"):
        shutil.rmtree(out_dir / stale, ignore_errors=True)
    (out_dir / "order_lines").mkdir(parents=True, exist_ok=True)
    (out_dir / "latent").mkdir(parents=True, exist_ok=True)

    seeds = np.random.SeedSequence(cfg.seed)
    catalogue_seed, *chunk_seeds = seeds.spawn(1 + -(-cfg.customers // cfg.chunk_customers))
    products = make_products(np.random.default_rng(catalogue_seed), cfg.products)
    pq.write_table(
        pa.table(
            {
                "sku": pa.array(products["sku"], pa.string()),
                "description": pa.array(products["description"], pa.string()),
                "category": pa.array(products["category"], pa.string()),
                "list_price": pa.array(products["list_price"], pa.float64()),
            }
        ),
        out_dir / "products.parquet",
    )
    cdfs = _product_choice_cdfs(products)

    writers: dict[str, pq.ParquetWriter] = {}
    orders = lines = reviews = 0
    try:
        for k, first in enumerate(range(0, cfg.customers, cfg.chunk_customers)):
            n = min(cfg.chunk_customers, cfg.customers - first)
            chunk = _simulate_chunk(
                cfg,
                np.random.default_rng(chunk_seeds[k]),
                first,
                FIRST_INVOICE + orders,
                n,
                products,
                cdfs,
            )
            for name, table in (
                ("customers.parquet", chunk.customers),
                ("latent/customer_truth.parquet", chunk.latent),
                ("reviews.parquet", chunk.reviews),
            ):
                if name not in writers:
                    writers[name] = pq.ParquetWriter(out_dir / name, table.schema)
                writers[name].write_table(table)
            pq.write_table(chunk.order_lines, out_dir / "order_lines" / f"part-{k:05d}.parquet")
            orders += chunk.orders
            lines += chunk.order_lines.num_rows
            reviews += chunk.reviews.num_rows
    finally:
        for writer in writers.values():
            writer.close()

    summary = SimulationSummary(str(out_dir), cfg.customers, cfg.products, orders, lines, reviews)
    manifest = {
        **asdict(cfg),
        "start": cfg.start.isoformat(),
        "end": cfg.end.isoformat(),
        **{f"n_{k}": v for k, v in asdict(summary).items() if k != "out_dir"},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return summary
