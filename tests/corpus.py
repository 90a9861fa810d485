"""The bad-input corpus: a clean Online Retail-shaped batch and the ways real batches go wrong.

Every case is generated from a seed, so a failing test can be replayed exactly.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

HEADER = [
    "InvoiceNo",
    "StockCode",
    "Description",
    "Quantity",
    "InvoiceDate",
    "UnitPrice",
    "CustomerID",
    "Country",
]
Row = dict[str, str]


def clean_batch(n: int = 2_000, seed: int = 0, day: datetime = datetime(2011, 3, 1)) -> list[Row]:
    """Lines of ~n/4 invoices on one day: ~10% guests, a few cancellations, positive prices."""
    rng = np.random.default_rng(seed)
    invoice = 600_000 + seed * 10_000 + np.sort(rng.integers(0, n // 4, n))
    customers = rng.integers(12_000, 18_000, n // 4 + 1)
    guest = rng.random(n // 4 + 1) < 0.1
    rows = []
    for i in range(n):
        k = invoice[i] - 600_000 - seed * 10_000
        cancelled = k % 50 == 0
        rows.append(
            {
                "InvoiceNo": ("C" if cancelled else "") + str(invoice[i]),
                "StockCode": str(20_000 + rng.integers(0, 300)),
                "Description": f"ITEM {rng.integers(0, 300)}",
                "Quantity": str((-1 if cancelled else 1) * int(rng.integers(1, 12))),
                "InvoiceDate": (day + timedelta(minutes=int(k))).strftime("%Y-%m-%d %H:%M:%S"),
                "UnitPrice": f"{rng.uniform(0.5, 20):.2f}",
                "CustomerID": "" if guest[k] else f"{customers[k]}.0",
                "Country": "United Kingdom",
            }
        )
    return rows


def write_csv(
    path: Path, rows: list[Row], header: list[str] | None = None, encoding: str = "utf-8"
) -> Path:
    header = header or HEADER
    with path.open("w", newline="", encoding=encoding, errors="strict") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def renamed_column(rows: list[Row]) -> tuple[list[Row], list[str]]:
    return [{("Qty" if k == "Quantity" else k): v for k, v in r.items()} for r in rows], [
        "Qty" if c == "Quantity" else c for c in HEADER
    ]


def missing_column(rows: list[Row]) -> tuple[list[Row], list[str]]:
    return rows, [c for c in HEADER if c != "Country"]


def extra_column(rows: list[Row]) -> tuple[list[Row], list[str]]:
    return [{**r, "Channel": "web"} for r in rows], [*HEADER, "Channel"]


def wrong_types(rows: list[Row]) -> list[Row]:
    out = [dict(r) for r in rows]
    for i in range(0, len(out), 100):
        out[i]["Quantity"] = "twelve"
    for i in range(50, len(out), 100):
        out[i]["InvoiceDate"] = "31/02/2011"
    return out


def negative_without_cancellation(rows: list[Row]) -> list[Row]:
    out = [dict(r) for r in rows]
    for r in out[::40]:
        if not r["InvoiceNo"].startswith("C"):
            r["Quantity"] = "-" + r["Quantity"].lstrip("-")
    return out


def implausible(rows: list[Row], column: str, value: Callable[[str], str], every: int) -> list[Row]:
    """Every ``every``-th row's ``column`` replaced as a broken export would write it."""
    out = [dict(r) for r in rows]
    for r in out[::every]:
        r[column] = value(r[column])
    return out


def huge_quantities(rows: list[Row], every: int = 20) -> list[Row]:
    return implausible(rows, "Quantity", lambda _: "999999999999", every)


def negative_product_prices(rows: list[Row], every: int = 20) -> list[Row]:
    return implausible(rows, "UnitPrice", lambda price: "-" + price, every)


def far_future_dates(rows: list[Row], every: int = 20) -> list[Row]:
    return implausible(rows, "InvoiceDate", lambda _: "2099-01-01 10:00:00", every)


def dates_before_the_shop(rows: list[Row], every: int = 20) -> list[Row]:
    return implausible(rows, "InvoiceDate", lambda _: "1900-01-01 10:00:00", every)


def prices_times(rows: list[Row], factor: float = 20) -> list[Row]:
    """Every price multiplied: plausible one by one, an order of magnitude off as a batch."""
    return implausible(rows, "UnitPrice", lambda price: f"{float(price) * factor:.2f}", 1)


def null_customers(rows: list[Row], share: float = 0.3, seed: int = 1) -> list[Row]:
    rng = np.random.default_rng(seed)
    return [{**r, "CustomerID": ""} if rng.random() < share else dict(r) for r in rows]


def much_smaller(rows: list[Row]) -> list[Row]:
    return [dict(r) for r in rows[: len(rows) // 10]]


def duplicated_lines(rows: list[Row], share: float = 0.2) -> list[Row]:
    extra = [dict(r) for r in rows[: int(len(rows) * share)]]
    return [dict(r) for r in rows] + extra


def mangled_encoding(path: Path, rows: list[Row]) -> Path:
    """A UTF-8 file with some descriptions written in Latin-1."""
    write_csv(path, rows)
    lines = path.read_bytes().split(b"\n")
    for i in range(1, len(lines) - 1, 250):
        lines[i] = lines[i].replace(b"ITEM", "CAFÉ".encode("latin-1"), 1)
    path.write_bytes(b"\n".join(lines))
    return path


MUTATIONS: dict[str, Callable[[list[Row]], list[Row]]] = {
    "negative_without_cancellation": negative_without_cancellation,
    "null_customers": null_customers,
    "much_smaller": much_smaller,
    "duplicated_lines": duplicated_lines,
}

# What a broken export writes into one row in 20: ingest quarantines each such row.
IMPLAUSIBLE: dict[str, Callable[[list[Row]], list[Row]]] = {
    "huge_quantities": huge_quantities,
    "negative_product_prices": negative_product_prices,
    "far_future_dates": far_future_dates,
    "dates_before_the_shop": dates_before_the_shop,
}
