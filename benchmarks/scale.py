"""Scale: generate, ingest, validate (raw checkpoint) and transform (dbt build) a small and
a large demo shop.

Each step runs in its own process; wall time and peak RSS are measured per step (for dbt, the
peak of the dbt process tree). The small shop is the baseline of the same run, so the ratios
show how cost grows with size (time should grow about linearly; memory should stay bounded).
Two baselines measured in the same run: a pandas load of the order-lines table (what
validating in pandas would need first) for the raw checkpoint, and one bare DuckDB query that
computes the customer features for the same cutoffs straight from the raw tables, for dbt.
Both run under the same DuckDB memory limit (VALUELOOP_DUCKDB_MEMORY_LIMIT, default 4GB).

    .venv/bin/python benchmarks/scale.py --small 100000 --large 1000000 --work /tmp/vl-scale
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
start = time.perf_counter()
exec(sys.argv[1])
peak = max(resource.getrusage(who).ru_maxrss for who in
           (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": peak / 1024}))
"""

# The customer features of marts.customer_features (int_cutoffs' default cutoffs: four
# labelled ones 30 days apart ending one 90-day horizon before the last day, and the last
# day), in one statement over the raw tables: what a hand-written job would run.
BARE_FEATURES_SQL = """
create or replace table main.bare_customer_features as
with
lines as (
    select
        trim(l.customer_id) as customer_id, l.invoice_id, l.sku, l.invoiced_at as ordered_at,
        l.invoiced_at::date as ordered_on, l.quantity * l.unit_price as line_amount,
        upper(l.invoice_id) like 'C%' as is_cancellation,
        upper(l.invoice_id) like 'R%' or (l.quantity < 0 and upper(l.invoice_id) not like 'C%')
            as is_return,
        coalesce(p.category, 'uncategorised') as category
    from raw.order_lines as l left join raw.products as p on l.sku = p.sku
    where nullif(trim(l.customer_id), '') is not null
        and upper(coalesce(l.sku, '')) not in ('POST', 'DOT', 'M', 'D', 'C2', 'BANK CHARGES',
            'AMAZONFEE', 'CRUK', 'PADS', 'B', 'S')
),
bounds as (select max(ordered_on) as last_day from lines),
cutoffs as (
    select last_day - to_days((90 + 30 * step)::integer) as as_of
    from bounds cross join range(0, 4) as steps (step)
    union select last_day from bounds
),
history as (
    select c.as_of, x.*, date_diff('day', x.ordered_on, c.as_of) as days_before
    from cutoffs as c inner join lines as x on x.ordered_on <= c.as_of
),
orders as (
    select customer_id, as_of, invoice_id, min(ordered_at) as ordered_at,
        min(days_before) as days_before, sum(line_amount) as amount
    from history where not is_cancellation and not is_return group by all
),
order_stats as (
    select customer_id, as_of, count(*) as frequency, min(days_before) as recency_days,
        max(days_before) as first_order_days_ago, sum(amount) as gross_spend,
        avg(amount) as avg_order_value,
        count(*) filter (where days_before < 30) as orders_last_30d,
        count(*) filter (where days_before < 90) as orders_last_90d,
        count(*) filter (where days_before < 180) as orders_last_180d,
        coalesce(sum(amount) filter (where days_before < 30), 0) as spend_last_30d,
        coalesce(sum(amount) filter (where days_before < 90), 0) as spend_last_90d,
        coalesce(sum(amount) filter (where days_before < 180), 0) as spend_last_180d,
        coalesce(sum(amount) filter (where days_before >= 90 and days_before < 180), 0)
            as spend_prior_90d,
        coalesce(sum(amount) filter (where days_before >= 180), 0) as spend_before_180d
    from orders group by all
),
gap_stats as (
    select customer_id, as_of, avg(gap) as ipt_mean_days, stddev_samp(gap) as ipt_std_days,
        max(gap) as ipt_max_days
    from (
        select customer_id, as_of, date_diff('second', lag(ordered_at) over (
            partition by customer_id, as_of order by ordered_at, invoice_id), ordered_at)
            / 86400.0 as gap
        from orders
    ) where gap is not null group by all
),
line_stats as (
    select customer_id, as_of, sum(line_amount) as monetary_value,
        coalesce(-sum(line_amount) filter (where is_cancellation), 0) as cancelled_amount,
        coalesce(-sum(line_amount) filter (where is_return), 0) as returned_amount,
        count(distinct sku) filter (where not is_cancellation and not is_return)
            as n_distinct_products,
        count(distinct category) filter (where not is_cancellation and not is_return)
            as n_distinct_categories
    from history group by all
),
top_category as (
    select customer_id, as_of, category as top_category,
        amount / nullif(sum(amount) over (partition by customer_id, as_of), 0)
            as top_category_share
    from (
        select customer_id, as_of, category, sum(line_amount) as amount from history
        where not is_cancellation and not is_return group by all
    )
    qualify row_number() over (
        partition by customer_id, as_of order by amount desc, category) = 1
),
review_stats as (
    select c.as_of, r.customer_id, count(*) as n_reviews, avg(r.rating) as avg_rating,
        min(r.rating) as min_rating
    from cutoffs as c inner join raw.reviews as r on r.reviewed_at::date <= c.as_of
    group by all
)
select
    o.*, c.country, date_diff('day', c.signed_up_at::date, o.as_of) as tenure_days,
    g.* exclude (customer_id, as_of), l.* exclude (customer_id, as_of),
    t.* exclude (customer_id, as_of), r.* exclude (customer_id, as_of)
from order_stats as o
left join raw.customers as c on o.customer_id = c.customer_id
left join gap_stats as g on o.customer_id = g.customer_id and o.as_of = g.as_of
left join line_stats as l on o.customer_id = l.customer_id and o.as_of = l.as_of
left join top_category as t on o.customer_id = t.customer_id and o.as_of = t.as_of
left join review_stats as r on o.customer_id = r.customer_id and o.as_of = r.as_of
"""


def measure(code: str, env: dict[str, str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, code], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"step failed: {code}\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_size(customers: int, work: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    home = work / f"home-{customers}"
    shutil.rmtree(home, ignore_errors=True)
    env = {**os.environ, "VALUELOOP_HOME": str(home)}
    steps = {
        "generate": "from valueloop import jobs; from valueloop.config import load_settings; "
        f"jobs.generate_demo(load_settings(), {customers}, 1)",
        "ingest": "from valueloop import jobs; from valueloop.config import load_settings; "
        "s = load_settings(); jobs.ingest_path(s, s.demo_dir, 'simulator')",
        "raw checkpoint": "from valueloop.config import load_settings; "
        "from valueloop.quality.runner import run_checkpoint; "
        "run_checkpoint(load_settings(), 'raw')",
        "pandas load of raw.order_lines (baseline)": "import duckdb; "
        "from valueloop.config import load_settings; "
        "con = duckdb.connect(str(load_settings().warehouse_path), read_only=True); "
        "frame = con.execute('select * from raw.order_lines').df(); print(len(frame))",
        "dbt build (every model and test)": "from valueloop.config import load_settings; "
        "from valueloop.transform import build; build(load_settings())",
        "dbt build +customer_features": "from valueloop.config import load_settings; "
        "from valueloop.transform import build; "
        "build(load_settings(), select='+customer_features')",
        "bare DuckDB query: customer features (baseline)": "import duckdb; "
        "from valueloop.config import load_settings; "
        "s = load_settings(); con = duckdb.connect(str(s.warehouse_path), "
        "config={'memory_limit': s.duckdb_memory_limit}); "
        f"con.execute({BARE_FEATURES_SQL!r}); con.close()",
    }
    return {
        name: measure(code, env)
        for name, code in steps.items()
        if not any(name.startswith(prefix) for prefix in skip)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/valueloop-scale"))
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="steps to leave out, by the start of their name (e.g. pandas: 21 GB at 1M)",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    skip = tuple(args.skip)
    small, large = run_size(args.small, args.work, skip), run_size(args.large, args.work, skip)
    print(
        f"| step | {args.small:,} customers | {args.large:,} customers | time ratio "
        f"| peak RSS ratio |\n|---|---|---|---|---|"
    )
    for step in small:
        s, g = small[step], large[step]
        print(
            f"| {step} | {s['seconds']:.1f} s, {s['peak_rss_mb']:.0f} MB | {g['seconds']:.1f} s,"
            f" {g['peak_rss_mb']:.0f} MB | {g['seconds'] / s['seconds']:.1f} | "
            f"{g['peak_rss_mb'] / s['peak_rss_mb']:.2f} |"
        )
    pandas = "pandas load of raw.order_lines (baseline)"
    if "raw checkpoint" in large and pandas in large:
        print(
            f"\nraw checkpoint at {args.large:,} customers: peak RSS "
            f"{large['raw checkpoint']['peak_rss_mb'] / large[pandas]['peak_rss_mb']:.2f}x "
            "of a pandas load of the table"
        )
    bare = "bare DuckDB query: customer features (baseline)"
    for size, steps in ((args.small, small), (args.large, large)):
        for step in ("dbt build (every model and test)", "dbt build +customer_features"):
            if step not in steps or bare not in steps:
                continue
            print(
                f"{step} at {size:,} customers: "
                f"{steps[step]['seconds'] / steps[bare]['seconds']:.2f}x the time and "
                f"{steps[step]['peak_rss_mb'] / steps[bare]['peak_rss_mb']:.2f}x the peak RSS "
                "of the bare query"
            )
    print(f"(total benchmark time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
