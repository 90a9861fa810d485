"""What reason codes cost at scoring: each champion kind's reason codes against its plain
prediction, on the same customers in the same run.

The models are fitted on the latest backtest origin of the warehouse's training set, as the
backtest fits them: LightGBM, the LightGBM + BG/NBD ensemble and, with ``--stack``, the
stack of the sequence transformer (``ml/configs/default.yaml``) with the two. The latest
cutoff's customers, replicated to ``--rows``, are scored with ``predict`` and explained with
``ml.reasons.explain`` (an ensemble: every member, ``ml.reasons.explain_ensemble``).

    python benchmarks/reasons_cost.py --warehouse data/warehouse.duckdb --rows 10000 --stack
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml import backtest, reasons
from ml.baselines import BGNBDBaseline, LightGBMBaseline
from ml.config import TrainConfig
from ml.data import TIERS, high_value_share, horizon_days, numeric_columns, read_mart
from ml.ensemble import AveragedEnsemble, MeanEnsemble
from ml.sequence import SequenceClassifier, read_texts


def _time(fn) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warehouse", type=Path, default=Path("data/warehouse.duckdb"))
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--stack", action="store_true", help="also fit and explain the stack")
    args = parser.parse_args()
    frame = read_mart(args.warehouse, "training_set")
    horizon = horizon_days(args.warehouse)
    origin = backtest.origins(frame, 1, horizon, high_value_share(args.warehouse))[0]
    numeric = numeric_columns(frame)
    trees = LightGBMBaseline(numeric, 42).fit(origin.train, origin.validation)
    models = {
        "LightGBM": trees,
        "ensemble (LightGBM + BG/NBD)": AveragedEnsemble(numeric, 42, horizon).fit(
            origin.train, origin.validation
        ),
    }
    if args.stack:
        transformer = SequenceClassifier(
            TrainConfig.load(),
            read_texts(args.warehouse),
            Path(tempfile.mkdtemp(prefix="reasons-cost-")),
            source=args.warehouse,
        ).fit(origin.train, origin.validation)
        btyd = BGNBDBaseline(horizon).fit(pd.concat([origin.train, origin.validation]))
        models["stack (transformer + LightGBM + BG/NBD)"] = MeanEnsemble(
            [transformer, trees, btyd], "stack"
        ).calibrate(origin.validation)
    copies = -(-args.rows // len(origin.test))
    customers = pd.concat([origin.test] * copies, ignore_index=True).head(args.rows)
    if args.stack:  # the scoring set carries each customer's events
        customers = transformer._with_sequences(customers)
    cutoff = origin.cutoff.date()
    print(f"{len(customers):,} customers, {len(origin.test):,} distinct (cutoff {cutoff})")
    print("| champion | predict | reason codes | customers/s explained | reasons ÷ predict |")
    print("|---|---|---|---|---|")
    for name, model in models.items():
        out, predict = _time(lambda model=model: model.predict(customers))
        published = pd.Series([TIERS[i] for i in out.predicted_tiers()], index=customers.index)
        _, explain = _time(
            lambda model=model, published=published: reasons.explain(model, customers, published)
        )
        print(
            f"| {name} | {predict:.2f} s | {explain:.2f} s | {len(customers) / explain:,.0f} | "
            f"{explain / predict:.0f}x |"
        )


if __name__ == "__main__":
    main()
