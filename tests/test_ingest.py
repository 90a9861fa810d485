"""Ingest through a real DuckDB file: idempotency, atomicity and quarantine accounting."""

from __future__ import annotations

import gzip
import shutil
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import duckdb
import openpyxl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import write_text
from valueloop import jobs, pipeline
from valueloop.config import Settings, load_settings
from valueloop.ingest import IngestError
from valueloop.loaders import TransactionsMapping

HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"
GOOD = [
    "536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,2010-12-01 08:26:00,2.55,17850.0,"
    "United Kingdom",
    "536365,71053,WHITE METAL LANTERN,6,2010-12-01 08:26:00,3.39,17850.0,United Kingdom",
    'C536379,D,"Discount, manual",-1,2010-12-01 09:41:00,27.5,14527.0,United Kingdom',
    "536414,22139,,56,2010-12-01 11:52:00,0,,United Kingdom",
]


def retail_csv(tmp_path: Path, rows: list[str], name: str = "retail.csv", **kw) -> Path:
    return write_text(tmp_path / name, "\n".join([HEADER, *rows]) + "\n", **kw)


def counts(settings: Settings) -> dict[str, int]:
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        return {
            table: con.execute(f"select count(*) from raw.{table}").fetchone()[0]
            for table in ("order_lines", "quarantine", "ingest_batches")
        }


def quarantine(settings: Settings) -> list[tuple]:
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        return con.execute(
            "select _row_number, column_name, reason from raw.quarantine order by _row_number"
        ).fetchall()


def test_good_file_loads_typed_with_lineage(settings: Settings, tmp_path: Path) -> None:
    path = retail_csv(tmp_path, GOOD)
    report = jobs.ingest_path(settings, path, "online-retail")
    assert (report.rows_read, report.rows_accepted, report.rows_quarantined) == (4, 4, 0)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        rows = con.execute(
            "select invoice_id, description, quantity, unit_price, invoiced_at::varchar,"
            " customer_id, _row_number, _source_file, _batch_id is not null,"
            " _loaded_at is not null from raw.order_lines order by _row_number"
        ).fetchall()
    assert rows[0][:7] == (
        "536365",
        "WHITE HANGING HEART T-LIGHT HOLDER",
        6,
        Decimal("2.55"),
        "2010-12-01 08:26:00",
        "17850",
        1,
    )
    assert rows[2][1] == "Discount, manual" and rows[2][2] == -1
    assert rows[3][5] is None  # a guest checkout keeps its row, without a customer
    assert all(r[7] == str(path.resolve()) and r[8] and r[9] for r in rows)


def test_loading_the_same_file_twice_changes_nothing(settings: Settings, tmp_path: Path) -> None:
    path = retail_csv(tmp_path, [*GOOD, "536999,1,X,not-a-number,2010-12-01 08:26:00,1,1,UK"])
    first = jobs.ingest_path(settings, path, "online-retail")
    before = counts(settings)
    second = jobs.ingest_path(settings, path, "online-retail")
    assert counts(settings) == before == {"order_lines": 4, "quarantine": 1, "ingest_batches": 1}
    assert second.results[0].skipped and second.results[0].batch_id == first.results[0].batch_id
    # The same content under another name is still the same batch.
    copy = write_text(tmp_path / "copy.csv", path.read_text())
    assert jobs.ingest_path(settings, copy, "online-retail").results[0].skipped


def test_a_batch_that_fails_halfway_leaves_nothing(settings: Settings, tmp_path: Path) -> None:
    jobs.ingest_path(settings, retail_csv(tmp_path, GOOD[:1], "earlier.csv"), "online-retail")
    before = counts(settings)
    # A truncated upload: the gzip stream ends after several chunks have been inserted.
    body = "\n".join([HEADER] + [GOOD[1].replace("536365", str(600000 + i)) for i in range(5000)])
    data = gzip.compress(body.encode())
    truncated = tmp_path / "truncated.csv.gz"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    sources = jobs.sources_for(truncated, "online-retail", chunk_rows=500)
    with duckdb.connect(str(settings.warehouse_path)) as con, pytest.raises(EOFError):
        from valueloop.ingest import ingest_source

        ingest_source(con, sources[0], settings)
    assert counts(settings) == before


@pytest.mark.parametrize(
    ("row", "column", "reason"),
    [
        (
            "536365,85123A,X,6,2010-13-45 08:26:00,2.55,17850.0,UK",
            "invoiced_at",
            "cannot parse 2010-13-45 08:26:00 as timestamp",
        ),
        (
            "536365,85123A,X,six,2010-12-01 08:26:00,2.55,17850.0,UK",
            "quantity",
            "cannot parse six as decimal(18, 4)",
        ),
        (
            "536365,85123A,X,6,2010-12-01 08:26:00,£2.55,17850.0,UK",
            "unit_price",
            "cannot parse £2.55 as decimal(18, 4)",
        ),
        (",85123A,X,6,2010-12-01 08:26:00,2.55,17850.0,UK", "invoice_id", "missing required value"),
        ("536365,85123A,X,6,,2.55,17850.0,UK", "invoiced_at", "missing required value"),
        ("536365,85123A,X,6,2010-12-01 08:26:00,2.55,17850.0", None, "expected 8 fields, found 7"),
        (
            "536365,85123A,X,999999999999,2010-12-01 08:26:00,2.55,17850.0,UK",
            "quantity",
            "quantity: 999999999999 outside the plausible range [-100000, 100000]"
            " (VALUELOOP_PLAUSIBLE_QUANTITY_MAX)",
        ),
        (
            "536365,85123A,X,6,2010-12-01 08:26:00,-2.55,17850.0,UK",
            "unit_price",
            "unit_price: -2.55 outside the plausible range [0, 100000] on a product line",
        ),
        (
            "536365,B,Adjust bad debt,1,2010-12-01 08:26:00,-250000,,UK",
            "unit_price",
            "unit_price: -250000 outside the plausible range [-100000, 100000]"
            " (VALUELOOP_PLAUSIBLE_PRICE_MAX)",
        ),
        (
            "536365,85123A,X,6,2099-01-01 10:00:00,2.55,17850.0,UK",
            "invoiced_at",
            "invoiced_at: 2099-01-01 10:00:00 outside the plausible range [1990-01-01, ",
        ),
        (
            "536365,85123A,X,6,1900-01-01 10:00:00,2.55,17850.0,UK",
            "invoiced_at",
            "invoiced_at: 1900-01-01 10:00:00 outside the plausible range [1990-01-01, ",
        ),
        (
            "536365,85123A,X,6,2010-12-01 08:26:00,2.55,17850.0,UK,extra",
            None,
            "expected 8 fields, found 9",
        ),
    ],
)
def test_bad_rows_are_quarantined_with_row_column_and_reason(
    settings: Settings, tmp_path: Path, row: str, column: str | None, reason: str
) -> None:
    path = retail_csv(tmp_path, [GOOD[0], row, GOOD[1]])
    report = jobs.ingest_path(settings, path, "online-retail")
    assert (report.rows_read, report.rows_accepted, report.rows_quarantined) == (3, 2, 1)
    [(row_number, column_name, why)] = quarantine(settings)
    assert row_number == 2 and column_name == column and reason in why
    assert report.quarantine_files and report.quarantine_files[0].read_text().count("\n") == 2


def test_the_extremes_of_real_shops_are_plausible(settings: Settings, tmp_path: Path) -> None:
    # Online Retail's largest order and its cancellation, bad-debt adjustments (code B, the
    # only negative prices), its dearest manual line, a free item, its first and last day.
    rows = [
        "581483,23843,PAPER CRAFT,80995,2011-12-09 09:15:00,2.08,16446.0,United Kingdom",
        "C581484,23843,PAPER CRAFT,-80995,2011-12-09 09:27:00,2.08,16446.0,United Kingdom",
        "A563186,B,Adjust bad debt,1,2011-08-12 14:51:00,-11062.06,,United Kingdom",
        "C556445,M,Manual,-1,2011-06-10 15:31:00,38970,15098.0,United Kingdom",
        "536414,22139,,56,2010-12-01 11:52:00,0,,United Kingdom",
    ]
    report = jobs.ingest_path(settings, retail_csv(tmp_path, rows), "online-retail")
    assert (report.rows_accepted, report.rows_quarantined) == (5, 0)


def test_the_plausible_ranges_come_from_the_settings(tmp_path: Path) -> None:
    settings = load_settings(
        env={
            "VALUELOOP_PLAUSIBLE_QUANTITY_MAX": "50",
            "VALUELOOP_PLAUSIBLE_PRICE_MAX": "20",
            "VALUELOOP_SHOP_OPENED_ON": "2010-12-01",
        },
        home=tmp_path / "home",
    )
    rows = [
        GOOD[0],
        GOOD[3].replace(",56,", ",51,"),
        GOOD[1].replace(",3.39,", ",20.01,"),
        GOOD[1].replace("2010-12-01 08:26:00", "2010-11-30 23:59:59"),
    ]
    report = jobs.ingest_path(settings, retail_csv(tmp_path, rows), "online-retail")
    assert (report.rows_read, report.rows_accepted, report.rows_quarantined) == (4, 1, 3)
    expected = [
        (2, "quantity", "quantity: 51 outside the plausible range [-50, 50]"),
        (
            3,
            "unit_price",
            "unit_price: 20.01 outside the plausible range [0, 20] on a product line",
        ),
        (
            4,
            "invoiced_at",
            "invoiced_at: 2010-11-30 23:59:59 outside the plausible range [2010-12-01",
        ),
    ]
    found = quarantine(settings)
    assert [r[:2] for r in found] == [e[:2] for e in expected]
    assert all(reason.startswith(e[2]) for (*_, reason), e in zip(found, expected, strict=True))


def test_implausible_customers_products_and_reviews_are_quarantined(
    settings: Settings, demo_shop: Path, tmp_path: Path
) -> None:
    shop = tmp_path / "shop"
    shutil.copytree(demo_shop, shop)

    def spoil(name: str, column: str, value: object) -> None:
        table = pq.read_table(shop / name)
        values = table[column].to_pylist()
        values[0] = value
        pq.write_table(
            table.set_column(
                table.schema.get_field_index(column), column, pa.array(values, table[column].type)
            ),
            shop / name,
        )

    spoil("customers.parquet", "signed_up_at", datetime(2099, 1, 1))
    spoil("products.parquet", "list_price", -4.5)
    spoil("reviews.parquet", "rating", 7)
    report = jobs.ingest_path(settings, shop, "simulator")
    assert report.rows_read == report.rows_accepted + report.rows_quarantined
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        found = con.execute(
            "select entity, _row_number, column_name, reason from raw.quarantine order by 1"
        ).fetchall()
    assert [r[:3] for r in found] == [
        ("customers", 1, "signed_up_at"),
        ("products", 1, "list_price"),
        ("reviews", 1, "rating"),
    ]
    assert found[0][3].startswith("signed_up_at: 2099-01-01 00:00:00 outside the plausible range")
    assert found[1][3] == (
        "list_price: -4.5 outside the plausible range [0, 100000] (VALUELOOP_PLAUSIBLE_PRICE_MAX)"
    )
    assert (
        found[2][3] == "rating: 7 outside the plausible range [1, 5] (stars, by the raw contract)"
    )


def test_every_row_is_accounted_for(settings: Settings, tmp_path: Path) -> None:
    rows = [GOOD[i % 4] if i % 3 else "x,y,z,bad,bad,bad,1,UK" for i in range(300)]
    report = jobs.ingest_path(settings, retail_csv(tmp_path, rows), "online-retail")
    assert report.rows_read == 300 == report.rows_accepted + report.rows_quarantined
    assert report.rows_quarantined == 100
    assert counts(settings)["order_lines"] == 200 and counts(settings)["quarantine"] == 100
    assert [r[0] for r in quarantine(settings)] == list(range(1, 301, 3))


def test_bom_and_crlf_are_read_like_plain_files(settings: Settings, tmp_path: Path) -> None:
    path = write_text(tmp_path / "windows.csv", "\r\n".join([HEADER, *GOOD]) + "\r\n", bom=True)
    report = jobs.ingest_path(settings, path, "online-retail")
    assert (report.rows_read, report.rows_quarantined) == (4, 0)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        assert (
            con.execute(
                "select count(*) from raw.order_lines where country like '%\r%'"
            ).fetchone()[0]
            == 0
        )


def test_invalid_bytes_are_quarantined_not_mangled(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(
        "\n".join([HEADER, GOOD[0], "536365,1,CAF\xc9 MUG,1,2010-12-01 08:26:00,2,1,UK"]).encode(
            "latin-1"
        )
        + b"\n"
    )
    report = jobs.ingest_path(settings, path, "online-retail")
    assert (report.rows_accepted, report.rows_quarantined) == (1, 1)
    [(row_number, column_name, why)] = quarantine(settings)
    assert (row_number, column_name) == (2, "description") and "invalid bytes" in why


def test_empty_file_and_wrong_header_fail_with_a_clear_error(
    settings: Settings, tmp_path: Path
) -> None:
    empty = write_text(tmp_path / "empty.csv", "")
    with pytest.raises(IngestError, match=r"empty.csv: the file is empty"):
        jobs.ingest_path(settings, empty, "online-retail")
    drifted = write_text(
        tmp_path / "drifted.csv",
        "InvoiceNo,StockCode,Qty,InvoiceDate,UnitPrice,CustomerID\n1,2,3,4,5,6\n",
    )
    with pytest.raises(IngestError, match=r"missing column\(s\) Description, Quantity, Country"):
        jobs.ingest_path(settings, drifted, "online-retail")
    doubled = write_text(
        tmp_path / "doubled.csv",
        "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country,"
        "Quantity\n1,2,3,4,5,6,7,8,9\n",
    )
    with pytest.raises(IngestError, match=r"doubled\.csv: the header names 'Quantity' more than"):
        jobs.ingest_path(settings, doubled, "online-retail")
    assert not settings.warehouse_path.exists()


def test_online_retail_ii_xlsx_loads_each_sheet_as_a_batch(
    settings: Settings, tmp_path: Path
) -> None:
    workbook = openpyxl.Workbook()
    header = [
        "Invoice",
        "StockCode",
        "Description",
        "Quantity",
        "InvoiceDate",
        "Price",
        "Customer ID",
        "Country",
    ]
    for index, sheet in enumerate(("Year 2009-2010", "Year 2010-2011")):
        ws = workbook.active if index == 0 else workbook.create_sheet()
        ws.title = sheet
        ws.append(header)
        ws.append(
            [
                "489434",
                "85048",
                "LED BAUBLE",
                12,
                datetime(2009 + index, 12, 1, 7, 45),
                6.95,
                13085.0,
                "United Kingdom",
            ]
        )
        ws.append(
            [
                "489435",
                "22350",
                "CAT BOWL",
                "twelve",
                datetime(2009 + index, 12, 1, 7, 46),
                2.55,
                None,
                "United Kingdom",
            ]
        )
    # A note right of the table pads every row read from the sheet with blank header cells;
    # they are not columns (before, two blank names broke the load with no file named).
    workbook["Year 2009-2010"].cell(row=3, column=11, value="checked by finance")
    path = tmp_path / "online_retail_II.xlsx"
    workbook.save(path)
    report = jobs.ingest_path(settings, path, "online-retail")
    assert [r.source_file.split("#")[1] for r in report.results] == [
        "Year 2009-2010",
        "Year 2010-2011",
    ]
    assert (report.rows_read, report.rows_accepted, report.rows_quarantined) == (4, 2, 2)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        assert con.execute("select distinct customer_id from raw.order_lines").fetchall() == [
            ("13085",)
        ]


TRANSACTIONS = [("u1", "20240105", "12.50"), ("u2", "20240106", "3"), ("u1", "20240301", "7.25")]
# The same facts in a file without a header row, semicolon-separated.
NO_HEADER = TransactionsMapping(
    customer_col="column_1",
    timestamp_col="column_2",
    amount_col="column_3",
    date_format="%Y%m%d",
    delimiter=";",
    header=False,
)


@pytest.mark.parametrize("layout", ["csv", "tsv", "whitespace", "no-header", "parquet"])
def test_a_shops_own_export_maps_onto_the_contract(
    settings: Settings, tmp_path: Path, layout: str
) -> None:
    mapping = TransactionsMapping(
        customer_col="client", timestamp_col="day", amount_col="amount", date_format="%Y%m%d"
    )
    if layout == "parquet":
        path = tmp_path / "export.parquet"
        pq.write_table(
            pa.table(
                {k: [r[i] for r in TRANSACTIONS] for i, k in enumerate(("client", "day", "amount"))}
            ),
            path,
        )
    else:
        sep = {"csv": ",", "tsv": "\t", "whitespace": "   ", "no-header": ";"}[layout]
        suffix = {"csv": ".csv", "tsv": ".tsv", "whitespace": ".txt", "no-header": ".dat"}[layout]
        lines = [sep.join(r) for r in TRANSACTIONS]
        if layout == "no-header":
            mapping = NO_HEADER
        else:
            lines.insert(0, sep.join(("client", "day", "amount")))
        path = write_text(tmp_path / f"export{suffix}", "\n".join(lines) + "\n")
    report = jobs.ingest_path(settings, path, "transactions", mapping)
    assert (report.rows_read, report.rows_accepted) == (3, 3)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        rows = con.execute(
            "select invoice_id, customer_id, invoiced_at::date::varchar, quantity,"
            " unit_price from raw.order_lines order by _row_number"
        ).fetchall()
    assert rows[0] == ("u1@20240105", "u1", "2024-01-05", 1, 12.5)
    assert sum(r[3] * r[4] for r in rows) == pytest.approx(22.75)


def test_a_file_without_header_may_repeat_values_in_its_first_row(
    settings: Settings, tmp_path: Path
) -> None:
    """Its first row is data: equal values there are no repeated column names."""
    path = write_text(tmp_path / "export.dat", "u1;20240105;5.00;5.00\nu2;20240106;3;1\n")
    report = jobs.ingest_path(settings, path, "transactions", NO_HEADER)
    assert (report.rows_read, report.rows_accepted) == (2, 2)
    named = replace(
        NO_HEADER,
        customer_col="client",
        timestamp_col="day",
        amount_col="amount",
        names=("client", "day", "amount", "amount"),
    )
    with pytest.raises(IngestError, match=r"\(--names\): the header names 'amount' more than"):
        jobs.ingest_path(settings, path, "transactions", named)


def test_a_landed_export_reads_its_mapping_file_and_a_bad_one_is_named(
    settings: Settings, tmp_path: Path
) -> None:
    """What the ingest DAG does with landing/transactions/<file>: the mapping beside it."""
    lines = ["client,day,amount", *(",".join(r) for r in TRANSACTIONS)]
    path = write_text(tmp_path / "sales.csv", "\n".join(lines) + "\n")
    mapping_file = tmp_path / "sales.csv.mapping.json"
    item = [{"path": str(path), "format": "transactions"}]
    for text, reason in (
        ("{not json", "Expecting property name"),
        ('{"customer": "client", "day": "day"}', "unexpected keyword argument 'customer'"),
        ('["client", "day"]', "expected a JSON object"),
    ):
        mapping_file.write_text(text)
        with pytest.raises(IngestError, match=rf"sales\.csv\.mapping\.json: .*{reason}"):
            pipeline.ingest_landed(settings, item)
    mapping_file.write_text(
        '{"customer_col": "client", "timestamp_col": "day", "amount_col": "amount",'
        ' "date_format": "%Y%m%d"}'
    )
    totals = pipeline.ingest_landed(settings, item)
    assert (totals["read"], totals["accepted"], totals["quarantined"]) == (3, 3, 0)


def test_quantity_and_price_mapping_and_a_bad_date_format(
    settings: Settings, tmp_path: Path
) -> None:
    path = write_text(
        tmp_path / "export.csv",
        "order,who,when,qty,price\nA1,u1,2024-01-05,2,1.5\nA2,u2,05/01/2024,1,2\n",
    )
    mapping = TransactionsMapping(
        customer_col="who",
        timestamp_col="when",
        quantity_col="qty",
        price_col="price",
        order_col="order",
    )
    report = jobs.ingest_path(settings, path, "transactions", mapping)
    assert (report.rows_accepted, report.rows_quarantined) == (1, 1)
    assert quarantine(settings) == [
        (2, "invoiced_at", "invoiced_at: cannot parse 05/01/2024 as timestamp")
    ]


def test_a_mapping_must_say_how_to_get_an_amount() -> None:
    with pytest.raises(ValueError, match="amount column, or both a quantity and a price"):
        TransactionsMapping(customer_col="c", timestamp_col="t", quantity_col="q")


def test_the_demo_shop_ingests_completely_and_keeps_the_truth_out(
    settings: Settings, demo_shop: Path
) -> None:
    report = jobs.ingest_path(settings, demo_shop, "simulator")
    assert report.rows_quarantined == 0
    assert {r.entity for r in report.results} == {"products", "customers", "order_lines", "reviews"}
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        tables = {
            r[0]
            for r in con.execute(
                "select table_name from information_schema.tables where table_schema = 'raw'"
            ).fetchall()
        }
        lines = con.execute("select count(*) from raw.order_lines").fetchone()[0]
    assert not any("truth" in t or "latent" in t for t in tables)
    assert lines == pq.read_metadata(next((demo_shop / "order_lines").glob("*.parquet"))).num_rows
