"""The dbt project through the real `dbt build` on a real DuckDB warehouse."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import duckdb
import pytest

from tests.conftest import ONLINE_RETAIL_CSV
from valueloop import jobs, transform
from valueloop.config import Settings, load_settings
from valueloop.simulator import SimulationConfig, generate

MARTS = (
    "dim_customers",
    "dim_products",
    "fct_orders",
    "fct_order_lines",
    "fct_daily_revenue",
    "customer_features",
    "customer_labels",
    "customer_documents",
    "training_set",
    "scoring_set",
)


def _warehouse(root: Path, customers: int, seed: int) -> Settings:
    settings = load_settings(env={"VALUELOOP_PII_SALT": "test-salt"}, home=root)
    generate(settings.demo_dir, SimulationConfig(customers=customers, seed=seed))
    jobs.ingest_path(settings, settings.demo_dir, "simulator")
    return settings


def query(settings: Settings, sql: str) -> list[tuple]:
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        return con.execute(sql).fetchall()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, transform.TransformResult]:
    settings = _warehouse(tmp_path_factory.mktemp("warehouse"), customers=1_500, seed=11)
    return settings, transform.build(settings, quiet=True)


def test_build_is_green_and_runs_every_kind_of_test(built) -> None:
    _, result = built
    assert not result.failed
    kinds = {n.unique_id.split(".")[0] for n in result.nodes}
    assert {"seed", "model", "test", "unit_test"} <= kinds


def test_every_mart_exists_and_has_rows(built) -> None:
    settings, _ = built
    for mart in MARTS:
        assert query(settings, f"select count(*) from marts.{mart}")[0][0] > 0, mart


def test_bi_marts_reconcile_with_raw(built) -> None:
    settings, _ = built
    [(raw_rows, raw_total, raw_customers)] = query(
        settings,
        """
        select count(*), sum(quantity * unit_price), count(distinct customer_id)
        from raw.order_lines""",
    )
    [(rows, total)] = query(
        settings, "select count(*), sum(line_amount) from marts.fct_order_lines"
    )
    [(daily_total,)] = query(settings, "select sum(net_revenue) from marts.fct_daily_revenue")
    [(orders_total,)] = query(settings, "select sum(total_amount) from marts.fct_orders")
    [(customers,)] = query(settings, "select count(*) from marts.dim_customers")
    assert rows == raw_rows
    assert total == raw_total == daily_total == orders_total
    assert customers == raw_customers == 1_500


def test_no_pii_leaves_staging(built) -> None:
    settings, _ = built
    columns = query(
        settings,
        """
        select table_schema, table_name, column_name from information_schema.columns
        where table_schema in ('staging', 'intermediate', 'marts')""",
    )
    assert not [c for c in columns if c[2] in ("email", "full_name")]
    emails = {r[0] for r in query(settings, "select email from raw.customers")}
    hashes = {r[0] for r in query(settings, "select email_hash from marts.dim_customers")}
    assert len(hashes) == len(emails) and not hashes & emails
    documents = " ".join(
        r[0] for r in query(settings, "select document from marts.customer_documents")
    )
    assert "@example.com" not in documents


def test_pseudonyms_depend_on_the_configured_salt(built) -> None:
    settings, _ = built
    [(email, stored)] = query(
        settings,
        """
        select lower(trim(c.email)), d.email_hash from raw.customers c
        join marts.dim_customers d using (customer_id) limit 1""",
    )
    import hashlib

    assert stored == hashlib.sha256(f"test-salt{email}".encode()).hexdigest()


def test_splits_follow_time_and_the_scoring_set_is_the_latest_day(built) -> None:
    settings, _ = built
    splits = dict(query(settings, "select split, max(as_of) from marts.training_set group by 1"))
    assert splits["train"] < splits["validation"] < splits["test"]
    [(score_day, n, distinct)] = query(
        settings,
        """
        select max(as_of), count(*), count(distinct customer_id) from marts.scoring_set""",
    )
    [(last_day,)] = query(settings, "select max(invoiced_at)::date from raw.order_lines")
    assert score_day == last_day and n == distinct
    [(high_share,)] = query(
        settings,
        """
        select avg((value_tier = 'high')::int) from marts.customer_labels
        where split = 'train' and future_spend > 0""",
    )
    assert 0.15 < high_share < 0.25


def test_docs_generate(built) -> None:
    settings, _ = built
    target = transform.docs(settings, quiet=True)
    assert (target / "index.html").exists() and (target / "catalog.json").exists()


def test_changing_the_future_changes_no_feature(tmp_path: Path) -> None:
    """Leakage: rewrite every event after as_of; features and documents at as_of stay put."""
    settings = _warehouse(tmp_path, customers=800, seed=3)
    cutoffs = [date(2025, 6, 30), date(2025, 8, 31)]
    snapshot = """
        select * exclude (full_length) from marts.customer_features
        join marts.customer_documents using (customer_cutoff_id, customer_id, as_of)
        where as_of = '2025-06-30' order by customer_cutoff_id"""
    labels = "select future_spend from marts.customer_labels where as_of = '2025-06-30' order by 1"
    transform.build(settings, as_of=cutoffs, quiet=True)
    before, labels_before = query(settings, snapshot), query(settings, labels)
    with duckdb.connect(str(settings.warehouse_path)) as con:
        con.execute(
            "update raw.order_lines set quantity = quantity * 3, description = 'X'"
            " where invoiced_at >= '2025-07-01'"
        )
        con.execute(
            "delete from raw.order_lines where invoiced_at >= '2025-08-15'"
            " and customer_id like '%7'"
        )
        con.execute(
            "update raw.reviews set rating = 1, review_text = 'awful'"
            " where reviewed_at >= '2025-07-01'"
        )
    transform.build(settings, as_of=cutoffs, quiet=True)
    after, labels_after = query(settings, snapshot), query(settings, labels)
    assert before and after == before
    assert labels_after != labels_before  # the rewrite did reach the future


def test_a_failing_dbt_test_is_reported_by_name(tmp_path: Path) -> None:
    settings = _warehouse(tmp_path, customers=200, seed=5)
    with duckdb.connect(str(settings.warehouse_path)) as con:
        con.execute(
            "update raw.reviews set rating = 7 where review_id in"
            " (select review_id from raw.reviews limit 2)"
        )
    with pytest.raises(transform.TransformError) as failure:
        transform.build(settings, quiet=True)
    message = str(failure.value)
    assert "accepted_values_stg_shop__reviews_rating" in message and "failing rows" in message
    # A dbt that stops before it runs anything is not reported with that run's failures.
    with pytest.raises(transform.TransformError) as failure:
        transform.run_dbt(settings, ["build", "--threads", "many"], quiet=True)
    assert "accepted_values" not in str(failure.value)


def test_transform_without_a_warehouse_says_what_to_do(tmp_path: Path) -> None:
    settings = load_settings(env={}, home=tmp_path)
    with pytest.raises(transform.TransformError, match="run `valueloop ingest` first"):
        transform.build(settings)


@pytest.mark.dataset
@pytest.mark.skipif(
    not ONLINE_RETAIL_CSV.exists(), reason=f"UCI Online Retail not found at {ONLINE_RETAIL_CSV}"
)
def test_online_retail_marts_reproduce_the_known_figures(tmp_path: Path) -> None:
    settings = load_settings(env={"VALUELOOP_PII_SALT": "test-salt"}, home=tmp_path)
    jobs.ingest_path(settings, ONLINE_RETAIL_CSV, "online-retail")
    assert not transform.build(settings, quiet=True).failed
    [(lines, customers, revenue, guests, cancelled)] = query(
        settings,
        """
        select count(*), count(distinct customer_id), round(sum(line_amount), 2),
               count(*) filter (is_guest), count(*) filter (is_cancellation)
        from marts.fct_order_lines""",
    )
    assert (lines, customers, float(revenue)) == (541_909, 4_372, 9_747_747.93)
    assert (guests, cancelled) == (135_080, 9_288)
    assert query(settings, "select count(*) from marts.dim_customers")[0][0] == 4_372
    [(invoices,)] = query(settings, "select count(*) from marts.fct_orders")
    assert invoices == 25_900
    [(daily,)] = query(settings, "select round(sum(net_revenue), 2) from marts.fct_daily_revenue")
    assert float(daily) == 9_747_747.93
