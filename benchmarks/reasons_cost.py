"""What reason codes cost at scoring: exact TreeSHAP of a LightGBM champion against its plain
prediction, on the same customers in the same run.

LightGBM is fitted on the latest backtest origin of the warehouse's training set (as the
platform's LightGBM is), then the latest cutoff's customers, replicated to ``--rows``, are
scored with ``predict`` and explained with ``ml.reasons.explain``.

    python benchmarks/reasons_cost.py --warehouse data/warehouse.duckdb --rows 10000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml import backtest, reasons
from ml.baselines import LightGBMBaseline
from ml.data import high_value_share, horizon_days, numeric_columns, read_mart


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warehouse", type=Path, default=Path("data/warehouse.duckdb"))
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()
    frame = read_mart(args.warehouse, "training_set")
    horizon = horizon_days(args.warehouse)
    origin = backtest.origins(frame, 1, horizon, high_value_share(args.warehouse))[0]
    model = LightGBMBaseline(numeric_columns(frame), 42).fit(origin.train, origin.validation)
    copies = -(-args.rows // len(origin.test))
    customers = pd.concat([origin.test] * copies, ignore_index=True).head(args.rows)
    start = time.perf_counter()
    model.predict(customers)
    predict = time.perf_counter() - start
    start = time.perf_counter()
    reasons.explain(model, customers)
    explain = time.perf_counter() - start
    trees = (model.churn_model.best_iteration_, model.tier_model.best_iteration_)
    print(
        f"{len(customers):,} customers; LightGBM with {trees[0]} churn and"
        f" {trees[1]} x 3 tier trees"
    )
    print(f"predict: {predict:.2f} s ({len(customers) / predict:,.0f} customers/s)")
    print(f"reasons: {explain:.2f} s ({len(customers) / explain:,.0f} customers/s)")
    print(f"reasons cost {explain / predict:.0f}x the prediction")


if __name__ == "__main__":
    main()
