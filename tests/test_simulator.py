from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from valueloop.simulator import CUSTOMER_TYPES, SimulationConfig, generate


def _tables(folder: Path) -> dict[str, object]:
    return {
        name: pq.read_table(folder / name)
        for name in (
            "customers.parquet",
            "products.parquet",
            "reviews.parquet",
            "latent/customer_truth.parquet",
        )
    } | {"order_lines": pq.read_table(folder / "order_lines")}


def test_same_seed_same_shop_and_another_seed_another(tmp_path: Path) -> None:
    cfg = SimulationConfig(customers=700, seed=3, chunk_customers=300)
    generate(tmp_path / "a", cfg)
    generate(tmp_path / "b", cfg)
    generate(tmp_path / "c", SimulationConfig(customers=700, seed=4, chunk_customers=300))
    a, b, c = _tables(tmp_path / "a"), _tables(tmp_path / "b"), _tables(tmp_path / "c")
    for name in a:
        assert a[name].equals(b[name]), name
    assert not a["order_lines"].equals(c["order_lines"])


def test_regenerating_into_the_same_folder_replaces_old_output(tmp_path: Path) -> None:
    generate(tmp_path, SimulationConfig(customers=900, seed=1, chunk_customers=300))
    generate(tmp_path, SimulationConfig(customers=200, seed=1, chunk_customers=300))
    assert len(list((tmp_path / "order_lines").glob("*.parquet"))) == 1
    assert pq.read_table(tmp_path / "customers.parquet").num_rows == 200


def test_distributions_are_sane(demo_shop: Path) -> None:
    con = duckdb.connect()
    lines = f"read_parquet('{demo_shop}/order_lines/*.parquet')"
    stats = con.execute(f"""
        select
            min(invoiced_at) >= '2023-01-01' as starts_after_opening,
            max(invoiced_at) <= '2025-12-31 23:59:59' as ends_before_end,
            bool_and(unit_price > 0) as prices_positive,
            bool_and((quantity < 0) = (invoice_id[1] in ('C', 'R'))) as negatives_are_reversals,
            avg((customer_id is null)::int) as guest_share,
            avg((invoice_id[1] = 'C')::int) as cancel_share,
            avg((invoice_id[1] = 'R')::int) as return_share,
            avg((sku = 'POST')::int) as postage_share
        from {lines}
    """).fetchone()
    assert stats[0] and stats[1] and stats[2] and stats[3]
    assert 0.05 < stats[4] < 0.2
    assert 0.005 < stats[5] < 0.05
    assert 0.01 < stats[6] < 0.08
    assert 0.01 < stats[7] < 0.2
    ratings = con.execute(
        f"select min(rating), max(rating), avg(rating) from '{demo_shop}/reviews.parquet'"
    ).fetchone()
    assert ratings[0] >= 1 and ratings[1] <= 5 and 3.0 < ratings[2] < 4.6
    # Every customer buys at signup: the first purchase is not before the account.
    early = con.execute(f"""
        select count(*) from {lines} l join '{demo_shop}/customers.parquet' c using (customer_id)
        where l.invoiced_at < c.signed_up_at
    """).fetchone()[0]
    assert early == 0


def test_latent_types_differ_in_future_value(demo_shop: Path) -> None:
    """Customers' types must be predictable from behaviour: the future differs by type."""
    rows = (
        duckdb.connect()
        .sql(f"""
        with future as (
            select customer_id, sum(quantity * unit_price) as spend
            from read_parquet('{demo_shop}/order_lines/*.parquet')
            where invoiced_at > '2025-09-01' and customer_id is not null
            group by 1
        )
        select customer_type, avg(coalesce(spend, 0)) as future_spend,
               avg((spend is not null)::int) as active_share
        from '{demo_shop}/latent/customer_truth.parquet' left join future using (customer_id)
        group by 1
    """)
        .fetchall()
    )
    by_type = {name: (spend, active) for name, spend, active in rows}
    assert set(by_type) == {t.name for t in CUSTOMER_TYPES}
    assert by_type["loyal_high_value"][0] > 3 * by_type["regular"][0]
    assert by_type["regular"][0] > 2 * by_type["one_off"][0]
    assert by_type["regular"][1] > by_type["drifting_away"][1] > by_type["one_off"][1]


def test_the_latent_truth_is_kept_apart(demo_shop: Path) -> None:
    customers = pq.read_table(demo_shop / "customers.parquet").column_names
    assert "customer_type" not in customers
    assert (demo_shop / "latent" / "customer_truth.parquet").exists()


@pytest.mark.parametrize("bad", [SimulationConfig(customers=0)])
def test_bad_configuration_is_refused(tmp_path: Path, bad: SimulationConfig) -> None:
    with pytest.raises(ValueError, match="at least one customer"):
        generate(tmp_path, bad)
