"""Rolling-origin backtest: every model trained and evaluated at several cutoffs, each trained
only on what was known at that cutoff.

The evaluation cutoffs are the latest ``n_cutoffs`` labelled cutoffs of ``marts.training_set``
(dbt vars ``n_training_cutoffs``, ``cutoff_step_days``, ``min_history_days``). For cutoff ``c``
a model trains on the labelled cutoffs whose whole label window had passed by ``c``
(``as_of + horizon_days <= c``): the latest of them validates (early stopping), the rest train;
with a single one, a hashed fifth of its customers validates. It is then scored on every
customer labelled at ``c``. Models: LightGBM on all features, LightGBM on nine RFM features,
BG/NBD, the RFM rule, the LightGBM + BG/NBD ensemble (``ml.ensemble``), the behaviour-sequence
transformer (``ml.sequence``, CoLES-pretrained on every customer's sequence at the validation
cutoff) and the stack of the transformer with LightGBM and BG/NBD. Nothing at or after ``c``
reaches its training rows (:func:`origins`, tested through the real marts), nor its tier
labels: the high-value threshold is set at each cutoff from the labels known there.

Per cutoff and averaged over cutoffs: churn ROC-AUC, PR-AUC and Brier score, tier macro-F1,
top-decile revenue capture, each with a bootstrap 95% interval, and each model's paired
difference against the best baseline (the best classic peer by mean churn ROC-AUC) on the
same resamples: a difference whose interval excludes zero is larger than the noise of the
holdouts; and every model's paired lead in mean customer_score (the gate's metric) over every
other, which the first-run gate of a training run on the same data reads (``verdict``,
``ml.train``). Logged to MLflow (experiment ``valueloop-backtest``) as one parent run with a
child per cutoff, with a plot of every metric over the cutoffs and the full table.

The bootstrap resamples customers, not rows, once for all cutoffs (:class:`CustomerBootstrap`):
a customer tested at several cutoffs is drawn the same number of times at each, so an
average over cutoffs is as uncertain as its customers make it, not as if every cutoff
brought new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ml import registry
from ml.baselines import BGNBDBaseline, LightGBMBaseline, RFMRuleBaseline
from ml.config import TrainConfig
from ml.data import (
    SEQUENCE_COLUMN,
    TEXT_COLUMN,
    high_value_share,
    horizon_days,
    labels_fingerprint,
    numeric_columns,
    read_per_cutoff,
    tier_index,
)
from ml.ensemble import AveragedEnsemble, MeanEnsemble
from ml.evaluate import Predictions, average_precision, brier, macro_f1, roc_auc
from ml.sequence import SequenceClassifier, read_texts

log = logging.getLogger(__name__)

EXPERIMENT = "valueloop-backtest"
METRICS = ("churn_roc_auc", "churn_pr_auc", "churn_brier", "tier_macro_f1", "top_decile_capture")
LOWER_IS_BETTER = {"churn_brier"}
# What a data team puts in a spreadsheet: recency, frequency, monetary value and their recent
# counterparts (the classic peer the platform has to beat).
RFM_FEATURES = (
    "recency_days",
    "frequency",
    "monetary_value",
    "first_order_days_ago",
    "avg_order_value",
    "orders_last_30d",
    "orders_last_90d",
    "orders_last_180d",
    "spend_last_90d",
)
BASELINES = ("lightgbm_rfm", "bg_nbd", "rfm_rule")
# The paired leads in mean customer_score between every two models (BacktestResult.leads).
LEADS_METRIC = "customer_score"
LEADS_ARTIFACT = f"backtest_{LEADS_METRIC}_leads.csv"
# What a backtest's figures mean: bumped when the labels it judges or the models it compares
# change (2026-11-28: tiers drawn with each cutoff's own threshold, coherent ensemble tiers;
# 2026-11-28.2: LightGBM's coherent tiers with decision weights; 2026-11-28.3: the sequence
# transformer's coherent tiers), so that a training run is never decided by a backtest of
# other models (``verdict``).
METHOD = "2026-11-28.3"
# Customers read per cutoff: bounds the backtest's memory (about 1.5 KiB a row in pandas).
MAX_ROWS_PER_CUTOFF = 100_000


@dataclass(frozen=True)
class Origin:
    """One evaluation cutoff with what may be learned before it."""

    cutoff: pd.Timestamp
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame

    @property
    def training_cutoffs(self) -> list[str]:
        days = pd.concat([self.train["as_of"], self.validation["as_of"]]).unique()
        return sorted(str(pd.Timestamp(d).date()) for d in days)


def _hashed_fifth(ids: pd.Series) -> np.ndarray:
    return np.array(
        [int(hashlib.sha256(str(i).encode()).hexdigest()[:8], 16) % 5 == 0 for i in ids]
    )


def tiers_as_known(
    history: pd.DataFrame, rows: pd.DataFrame, share: float
) -> tuple[pd.DataFrame, float]:
    """``rows`` with the high-value tier drawn as at a cutoff where only ``history``'s labels
    are known: the threshold is the top ``share`` of history's buyers' spend (as dbt's
    customer_labels fixes it on the train split), not one that later cutoffs' spend helped
    set. Lapsed, and so churn, does not depend on it; a tier that a correction from people
    set stays (``tier_corrected``). Returns the rows and the threshold."""
    spend = history.loc[history["future_spend"] > 0, "future_spend"]
    threshold = float(spend.quantile(1 - share)) if len(spend) else float("inf")
    derived = np.where(
        rows["future_orders"] == 0,
        "lapsed",
        np.where(rows["future_spend"] >= threshold, "high", "active"),
    )
    kept = rows["tier_corrected"].astype(bool)
    return rows.assign(value_tier=rows["value_tier"].where(kept, derived)), threshold


def origins(
    frame: pd.DataFrame, n_cutoffs: int, horizon: int, high_share: float | None = None
) -> list[Origin]:
    """The latest ``n_cutoffs`` labelled cutoffs that have at least one fully labelled cutoff
    before them, oldest first, each with its training and validation rows. With
    ``high_share``, every row of an origin has its value tier drawn with the threshold its
    known labels give (:func:`tiers_as_known`); without, the marts' tiers stay."""
    frame = frame[frame["is_labelled"]] if "is_labelled" in frame else frame
    frame = frame.assign(as_of=pd.to_datetime(frame["as_of"]))
    days = sorted(frame["as_of"].unique())
    chosen: list[Origin] = []
    for cutoff in reversed(days):
        known = [d for d in days if d + pd.Timedelta(days=horizon) <= cutoff]
        if not known:
            continue
        history = frame[frame["as_of"].isin(known)]
        if len(known) > 1:
            validation = history[history["as_of"] == known[-1]]
            train = history[history["as_of"] != known[-1]]
        else:
            held = _hashed_fifth(history["customer_id"])
            validation, train = history[held], history[~held]
        test = frame[frame["as_of"] == cutoff]
        if high_share is not None:
            train, validation, test = (
                tiers_as_known(history, rows, high_share)[0] for rows in (train, validation, test)
            )
        chosen.append(Origin(pd.Timestamp(cutoff), train, validation, test))
        if len(chosen) == n_cutoffs:
            break
    if not chosen:
        raise ValueError(
            "no labelled cutoff has a fully labelled cutoff before it: the data needs more "
            f"history than {len(days)} labelled cutoff(s) with a {horizon}-day horizon "
            "(raise the dbt var n_training_cutoffs or lower cutoff_step_days)"
        )
    return list(reversed(chosen))


class CustomerBootstrap:
    """``n`` resamples of ``customers`` with replacement (a cluster bootstrap). Resample ``b``
    draws each customer the same number of times wherever it is read, so the same resample
    at two cutoffs holds the same customers; each is regenerated from ``(seed, b)`` when it
    is read, so only one resample is in memory at a time."""

    def __init__(self, customers: pd.Index, n: int, seed: int) -> None:
        if not customers.is_unique:
            raise ValueError("CustomerBootstrap needs each customer once")
        self.customers, self.n, self.seed = customers, n, seed

    def counts(self, b: int) -> np.ndarray:
        """How many times resample ``b`` draws each customer."""
        size = len(self.customers)
        draws = np.random.default_rng([self.seed, b]).integers(0, size, size)
        return np.bincount(draws, minlength=size)

    def rows(self, ids: pd.Series) -> Iterator[np.ndarray]:
        """Per resample, in order, the positions of the rows of ``ids`` it draws (one row per
        customer, repeated as often as the resample draws the customer)."""
        where = self.customers.get_indexer(ids)
        if (where < 0).any():
            raise ValueError(f"{int((where < 0).sum())} customer(s) outside the bootstrap's")
        everyone = np.arange(len(ids))
        for b in range(self.n):
            yield np.repeat(everyone, self.counts(b)[where])


def metric_values(test: pd.DataFrame, predictions: Predictions, rows: np.ndarray) -> dict:
    if not len(rows):  # a resample that drew none of this cutoff's customers
        return dict.fromkeys(METRICS, np.nan)
    churn = test["is_churned"].to_numpy(dtype=int)[rows]
    p = predictions.churn_prob[rows]
    spend = test["future_spend"].to_numpy(dtype="float64")[rows]
    out = {
        "churn_roc_auc": roc_auc(churn, p) if 0 < churn.sum() < len(churn) else np.nan,
        "churn_pr_auc": average_precision(churn, p) if churn.sum() else np.nan,
        "churn_brier": brier(churn, p),
        "tier_macro_f1": np.nan,
    }
    if predictions.tier_probs is not None:
        tiers = tier_index(test["value_tier"])[rows]
        out["tier_macro_f1"] = macro_f1(tiers, predictions.predicted_tiers(rows))
    total = spend.clip(min=0).sum()
    top = np.argsort(-predictions.value_score[rows], kind="stable")[: max(1, len(rows) // 10)]
    out["top_decile_capture"] = float(spend.clip(min=0)[top].sum() / total) if total > 0 else np.nan
    return {k: float(v) for k, v in out.items()}


@dataclass
class BacktestResult:
    per_cutoff: pd.DataFrame  # cutoff, model, metric, value, low, high
    differences: pd.DataFrame  # cutoff ('mean' for the average), model, metric, diff, low, high
    reference: str  # the best baseline
    parent_run_id: str | None = None
    origins: list[dict] = field(default_factory=list)
    # Every ordered pair of models with a customer_score (model, versus, diff, low, high):
    # the paired lead in mean customer_score over the cutoffs, for the first-run gate.
    leads: pd.DataFrame = field(default_factory=pd.DataFrame)

    def summary(self) -> str:
        mean = self.per_cutoff[self.per_cutoff["cutoff"] == "mean"]
        lines = [
            f"rolling-origin backtest over {len(self.origins)} cutoffs "
            f"({', '.join(o['cutoff'] for o in self.origins)}); mean [95% interval]:"
        ]
        models = list(dict.fromkeys(mean["model"]))
        width = max(len(m) for m in models)
        lines.append(f"{'model':<{width}}  " + "  ".join(f"{m:>22}" for m in METRICS))
        for model in models:
            rows = mean[mean["model"] == model].set_index("metric")
            cells = [
                f"{rows.at[m, 'value']:.3f} [{rows.at[m, 'low']:.3f},{rows.at[m, 'high']:.3f}]"
                if m in rows.index and np.isfinite(rows.at[m, "value"])
                else "-"
                for m in METRICS
            ]
            lines.append(f"{model:<{width}}  " + "  ".join(f"{c:>22}" for c in cells))
        lines.append(f"paired difference in mean churn ROC-AUC against {self.reference}:")
        diffs = self.differences[
            (self.differences["cutoff"] == "mean") & (self.differences["metric"] == "churn_roc_auc")
        ]
        for row in diffs.itertuples():
            verdict = "wins" if row.low > 0 else "loses" if row.high < 0 else "within the noise"
            lines.append(
                f"  {row.model:<{width}} {row.diff:+.4f} [{row.low:+.4f}, {row.high:+.4f}] "
                f"{verdict}"
            )
        if self.parent_run_id:
            lines.append(f"MLflow run {self.parent_run_id} (experiment {EXPERIMENT})")
        return "\n".join(lines)


# The stack: the sequence transformer averaged with the classic models (ml.ensemble.MeanEnsemble).
STACK_MEMBERS = ("transformer", "lightgbm", "bg_nbd")


def model_config_tag(cfg: TrainConfig, seed: int) -> str:
    """The backtest run's ``valueloop.model_config``: the training settings' fingerprint, which
    a training run looks for (``verdict``), marked when the classic models' seed (``seed``)
    is not the training config's, so that such a backtest speaks for no training run."""
    fingerprint = cfg.model_fingerprint()
    return fingerprint if seed == cfg.seed else f"{fingerprint}-seed{seed}"


def _models(numeric: list[str], seed: int, horizon: int, cfg, warehouse: Path, cache_dir) -> dict:
    texts = None

    def transformer():
        nonlocal texts
        texts = read_texts(warehouse) if texts is None else texts
        return SequenceClassifier(cfg, texts, cache_dir, source=warehouse)

    return {
        "lightgbm": lambda: LightGBMBaseline(numeric, seed),
        "lightgbm_rfm": lambda: LightGBMBaseline(list(RFM_FEATURES), seed, (), "lightgbm_rfm"),
        "bg_nbd": lambda: BGNBDBaseline(horizon),
        "rfm_rule": lambda: RFMRuleBaseline(),
        "ensemble": lambda: AveragedEnsemble(numeric, seed, horizon),
        "transformer": transformer,
        "stack": None,  # built from the fitted members (_fit_all)
    }


def _fit_all(names: list[str], builders: dict, origin: Origin) -> dict:
    """Every model fitted on the origin; the stack reuses its members' fits."""
    fitted: dict = {}
    for name in names:
        if name == "stack":
            members = [fitted.get(m) or _fit(m, builders[m](), origin) for m in STACK_MEMBERS]
            fitted[name] = MeanEnsemble(members, "stack").calibrate(origin.validation)
        else:
            fitted[name] = _fit(name, builders[name](), origin)
    return fitted


def _fit(name: str, model, origin: Origin):
    if name.startswith("lightgbm") or name in ("ensemble", "transformer"):
        return model.fit(origin.train, origin.validation)
    # One-shot models learn from every labelled row before the cutoff.
    return model.fit(pd.concat([origin.train, origin.validation]))


def run(
    warehouse: Path,
    tracking_uri: str | None,
    artifacts_dir: Path | None,
    n_cutoffs: int = 4,
    n_bootstrap: int = 500,
    seed: int = 42,
    models: tuple[str, ...] | None = None,
    out_dir: Path | None = None,
    cfg: TrainConfig | None = None,
    cache_dir: Path | None = None,
    max_rows_per_cutoff: int | None = MAX_ROWS_PER_CUTOFF,
) -> BacktestResult:
    """Train and evaluate every model at each cutoff; log to MLflow when ``tracking_uri``.
    ``cfg`` sizes the sequence transformer (default ml/configs/default.yaml); its text
    embeddings and pretrained encoders are cached in ``cache_dir``. Each cutoff contributes at
    most ``max_rows_per_cutoff`` customers (an md5 draw stratified by value tier; ``None``:
    every customer), to train on and to evaluate."""
    # At most max_rows_per_cutoff customers per cutoff, without the event sequences and
    # documents: the transformer reads the sequences of the rows it samples and scores
    # (ml.data.read_sequences). Memory is bounded by the cutoffs times the cap.
    frame = read_per_cutoff(
        warehouse, max_rows_per_cutoff, seed, without=(SEQUENCE_COLUMN, TEXT_COLUMN)
    )
    horizon = horizon_days(warehouse)
    numeric = numeric_columns(frame)
    cfg = cfg or TrainConfig.load()
    cache_dir = cache_dir or Path(tempfile.mkdtemp(prefix="valueloop-backtest-cache-"))
    builders = _models(numeric, seed, horizon, cfg, warehouse, cache_dir)
    names = list(models or builders)
    unknown = set(names) - set(builders)
    if unknown:
        raise ValueError(f"unknown models {sorted(unknown)}; known: {sorted(builders)}")
    if "tier_corrected" not in frame:
        raise ValueError(
            f"{warehouse}: training_set has no tier_corrected column (marts built by an "
            "older version): rebuild the marts (`valueloop transform`)"
        )
    plan = origins(frame, n_cutoffs, horizon, high_value_share(warehouse))
    per_cutoff, replicates = evaluate_cutoffs(
        plan,
        names,
        lambda origin, test: {
            name: model.predict(test) for name, model in _fit_all(names, builders, origin).items()
        },
        n_bootstrap,
        seed,
    )
    cutoffs = [str(o.cutoff.date()) for o in plan]
    mean_auc = per_cutoff[(per_cutoff.cutoff == "mean") & (per_cutoff.metric == "churn_roc_auc")]
    candidates = mean_auc[mean_auc.model.isin(BASELINES)]
    reference = (
        candidates.sort_values("value", ascending=False)["model"].iloc[0]
        if len(candidates)
        else mean_auc.sort_values("value", ascending=False)["model"].iloc[0]
    )
    differences = _paired(per_cutoff, replicates, names, cutoffs, reference)
    result = BacktestResult(
        per_cutoff,
        differences,
        reference,
        leads=_leads(per_cutoff, replicates, names, cutoffs),
        origins=[
            {
                "cutoff": str(o.cutoff.date()),
                "training_cutoffs": o.training_cutoffs,
                "test_rows": len(o.test),
            }
            for o in plan
        ],
    )
    if tracking_uri:
        result.parent_run_id = _log(
            result, tracking_uri, artifacts_dir, n_bootstrap, out_dir, warehouse, cfg, seed
        )
    return result


def evaluate_cutoffs(
    plan: list[Origin],
    names: list[str],
    predict: Callable[[Origin, pd.DataFrame], dict[str, Predictions]],
    n_bootstrap: int,
    seed: int,
) -> tuple[pd.DataFrame, dict[tuple[str, str], pd.DataFrame]]:
    """Every model's metrics at each cutoff of ``plan`` and averaged over them, with bootstrap
    95% intervals (cutoff, model, metric, value, low, high; cutoff ``mean`` for the average),
    and the bootstrap replicates per (cutoff, model) that paired differences are read from.
    ``predict(origin, test)`` fits the models at a cutoff and predicts its ``test`` rows. One
    :class:`CustomerBootstrap` serves every cutoff, so resample b holds the same customers
    at each and the interval of an average counts each customer once."""
    bootstrap = CustomerBootstrap(
        pd.Index(pd.unique(pd.concat([o.test["customer_id"] for o in plan]))), n_bootstrap, seed
    )
    records, replicates = [], {}
    for origin in tqdm(plan, desc="backtest cutoffs", unit="cutoff"):
        cutoff = str(origin.cutoff.date())
        test = origin.test.reset_index(drop=True)
        everyone = np.arange(len(test))
        predicted = predict(origin, test)
        for name in names:
            predictions = predicted[name]
            point = metric_values(test, predictions, everyone)
            boot = pd.DataFrame(
                [metric_values(test, predictions, s) for s in bootstrap.rows(test["customer_id"])]
            )
            replicates[(cutoff, name)] = boot
            for metric in METRICS:
                low, high = (
                    np.nanpercentile(boot[metric], [2.5, 97.5])
                    if boot[metric].notna().any()
                    else (np.nan, np.nan)
                )
                records.append((cutoff, name, metric, point[metric], low, high))
    per_cutoff = pd.DataFrame(
        records, columns=["cutoff", "model", "metric", "value", "low", "high"]
    )
    cutoffs = [str(o.cutoff.date()) for o in plan]
    # The average over cutoffs, with its interval from averaging the cutoffs' replicates (the
    # same customers in resample b at every cutoff).
    means = []
    for name in names:
        stacked = sum(replicates[(c, name)] for c in cutoffs) / len(cutoffs)
        for metric in METRICS:
            value = per_cutoff[(per_cutoff.model == name) & (per_cutoff.metric == metric)][
                "value"
            ].mean()
            low, high = (
                np.nanpercentile(stacked[metric], [2.5, 97.5])
                if stacked[metric].notna().any()
                else (np.nan, np.nan)
            )
            means.append(("mean", name, metric, value, low, high))
    per_cutoff = pd.concat(
        [per_cutoff, pd.DataFrame(means, columns=per_cutoff.columns)], ignore_index=True
    )
    return per_cutoff, replicates


@dataclass(frozen=True)
class Verdict:
    """What a backtest of this warehouse says of some models: each one's mean of a metric."""

    run_id: str
    cutoffs: int
    latest_cutoff: str
    scores: dict[str, float]
    # LEADS_ARTIFACT's table; None for a backtest logged before it was written.
    leads: pd.DataFrame | None = field(default=None, compare=False)

    @property
    def winner(self) -> str:
        return max(self.scores, key=self.scores.__getitem__)

    def lead(self, model: str, versus: str) -> tuple[float, float, float] | None:
        """``model``'s paired lead in mean customer_score over ``versus`` and its 95%
        interval; None when this backtest did not record it."""
        if self.leads is None:
            return None
        row = self.leads[(self.leads["model"] == model) & (self.leads["versus"] == versus)]
        if row.empty:
            return None
        return float(row["diff"].iloc[0]), float(row["low"].iloc[0]), float(row["high"].iloc[0])

    def describe(self, metric: str) -> str:
        ranked = sorted(self.scores.items(), key=lambda kv: -kv[1])
        return (
            f"mean {metric} over backtest run {self.run_id[:12]}'s {self.cutoffs} cutoffs "
            f"through {self.latest_cutoff}: " + ", ".join(f"{m} {v:.4f}" for m, v in ranked)
        )


def verdict(
    tracking_uri: str,
    source: Path,
    latest_cutoff: str,
    models: tuple[str, ...],
    metric: str,
    model_config: str | None = None,
) -> Verdict | None:
    """The latest backtest of the data in ``source`` (a warehouse, or a training snapshot of
    it: the backtest is found by the training set's rows and labels, ``labels_fingerprint``,
    so a label correction since makes it another data set) whose latest cutoff is
    ``latest_cutoff`` (so it tested on the labels a training run holds out now), run by this
    version's method (:data:`METHOD`), that ran every one of ``models`` and,
    when ``model_config`` is given, trained them with the settings of that fingerprint
    (``TrainConfig.model_fingerprint``): each model's mean ``metric`` over its cutoffs
    (``customer_score``: the mean of churn ROC-AUC and tier macro-F1, as on the holdout).
    None when there is no such backtest."""
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            "tags.`valueloop.kind` = 'backtest' and attributes.status = 'FINISHED' "
            f"and tags.`valueloop.labels` = '{labels_fingerprint(Path(source))}' "
            f"and tags.`valueloop.latest_cutoff` = '{latest_cutoff}' "
            f"and tags.`valueloop.backtest_method` = '{METHOD}'"
            + (f" and tags.`valueloop.model_config` = '{model_config}'" if model_config else "")
        ),
        order_by=["attributes.start_time DESC"],
    )
    parts = ("churn_roc_auc", "tier_macro_f1") if metric == "customer_score" else (metric,)
    for run in runs:
        found = run.data.metrics
        if all(f"{m}_{p}" in found for m in models for p in parts):
            leads = None
            if LEADS_ARTIFACT in {a.path for a in client.list_artifacts(run.info.run_id)}:
                with tempfile.TemporaryDirectory() as tmp:
                    leads = pd.read_csv(
                        client.download_artifacts(run.info.run_id, LEADS_ARTIFACT, tmp)
                    )
            return Verdict(
                run.info.run_id,
                int(run.data.params.get("cutoffs", 0)),
                latest_cutoff,
                {m: float(np.mean([found[f"{m}_{p}"] for p in parts])) for m in models},
                leads,
            )
    return None


def _paired(per_cutoff, replicates, names, cutoffs, reference) -> pd.DataFrame:
    rows = []
    for name in names:
        if name == reference:
            continue
        for metric in METRICS:
            per = []
            for cutoff in cutoffs:
                diff = replicates[(cutoff, name)][metric] - replicates[(cutoff, reference)][metric]
                point = _value(per_cutoff, cutoff, name, metric) - _value(
                    per_cutoff, cutoff, reference, metric
                )
                per.append(diff.to_numpy())
                rows.append((cutoff, name, metric, point, *_interval(diff.to_numpy())))
            point = np.mean(
                [
                    _value(per_cutoff, c, name, metric) - _value(per_cutoff, c, reference, metric)
                    for c in cutoffs
                ]
            )
            rows.append(("mean", name, metric, point, *_interval(np.mean(per, axis=0))))
    return pd.DataFrame(rows, columns=["cutoff", "model", "metric", "diff", "low", "high"])


def _customer_score(frame: pd.DataFrame) -> pd.Series:
    """The gate's primary metric from the backtest's: mean of churn ROC-AUC and tier macro-F1."""
    return (frame["churn_roc_auc"] + frame["tier_macro_f1"]) / 2


def _leads(per_cutoff, replicates, names, cutoffs) -> pd.DataFrame:
    """Each model's lead in mean customer_score over every other, paired: both scored on the
    same customer resamples (the same customers at every cutoff), each resample's leads averaged
    over the cutoffs."""
    points = {
        name: np.mean(
            [
                (
                    _value(per_cutoff, c, name, "churn_roc_auc")
                    + _value(per_cutoff, c, name, "tier_macro_f1")
                )
                / 2
                for c in cutoffs
            ]
        )
        for name in names
    }
    scored = [n for n in names if np.isfinite(points[n])]  # BG/NBD predicts no tier
    rows = []
    for name in scored:
        for versus in scored:
            if versus == name:
                continue
            per = [
                (
                    _customer_score(replicates[(c, name)])
                    - _customer_score(replicates[(c, versus)])
                ).to_numpy()
                for c in cutoffs
            ]
            rows.append(
                (name, versus, points[name] - points[versus], *_interval(np.mean(per, axis=0)))
            )
    return pd.DataFrame(rows, columns=["model", "versus", "diff", "low", "high"])


def _value(per_cutoff: pd.DataFrame, cutoff: str, model: str, metric: str) -> float:
    chosen = per_cutoff[
        (per_cutoff.cutoff == cutoff) & (per_cutoff.model == model) & (per_cutoff.metric == metric)
    ]
    return float(chosen["value"].iloc[0])


def _interval(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return (np.nan, np.nan)
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def plot(result: BacktestResult, path: Path) -> Path:
    data = result.per_cutoff[result.per_cutoff.cutoff != "mean"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.8))
    for ax, metric in zip(axes, METRICS, strict=True):
        for model, rows in data[data.metric == metric].groupby("model", sort=False):
            x = pd.to_datetime(rows["cutoff"])
            ax.plot(x, rows["value"], "o-", label=model)
            ax.fill_between(x, rows["low"], rows["high"], alpha=0.15)
        ax.set_title(metric.replace("_", " "))
        ax.tick_params(axis="x", rotation=45)
    axes[0].legend(fontsize=8)
    fig.suptitle("rolling-origin backtest: each cutoff trained only on what was known before it")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _log(result, tracking_uri, artifacts_dir, n_bootstrap, out_dir, warehouse, cfg, seed) -> str:
    registry.configure(tracking_uri, artifacts_dir, EXPERIMENT)
    with (
        tempfile.TemporaryDirectory(prefix="valueloop-backtest-") as tmp,
        mlflow.start_run(run_name=f"backtest-{datetime.now(UTC):%Y%m%dT%H%M%S}") as parent,
    ):
        mlflow.set_tags(
            {
                "valueloop.kind": "backtest",
                "valueloop.reference": result.reference,
                "valueloop.warehouse": str(Path(warehouse).resolve()),
                # what a training run of the same data looks for (``verdict``)
                "valueloop.labels": labels_fingerprint(Path(warehouse)),
                "valueloop.latest_cutoff": result.origins[-1]["cutoff"],
                "valueloop.model_config": model_config_tag(cfg, seed),
                "valueloop.backtest_method": METHOD,
            }
        )
        mlflow.log_params({"cutoffs": len(result.origins), "bootstrap": n_bootstrap})
        for origin in result.origins:
            cutoff = origin["cutoff"]
            with mlflow.start_run(run_name=f"cutoff-{cutoff}", nested=True):
                mlflow.set_tags({"valueloop.kind": "backtest-cutoff", "cutoff": cutoff})
                mlflow.log_params(
                    {
                        "training_cutoffs": ",".join(origin["training_cutoffs"]),
                        "test_rows": origin["test_rows"],
                    }
                )
                rows = result.per_cutoff[result.per_cutoff.cutoff == cutoff]
                mlflow.log_metrics(
                    {
                        f"{r.model}_{r.metric}": r.value
                        for r in rows.itertuples()
                        if np.isfinite(r.value)
                    }
                )
        mean = result.per_cutoff[result.per_cutoff.cutoff == "mean"]
        mlflow.log_metrics(
            {f"{r.model}_{r.metric}": r.value for r in mean.itertuples() if np.isfinite(r.value)}
        )
        folder = Path(out_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        mlflow.log_artifact(str(plot(result, folder / "backtest_metrics.png")), "plots")
        result.per_cutoff.to_csv(folder / "backtest_metrics.csv", index=False)
        result.differences.to_csv(folder / "backtest_paired_differences.csv", index=False)
        mlflow.log_artifact(str(folder / "backtest_metrics.csv"))
        mlflow.log_artifact(str(folder / "backtest_paired_differences.csv"))
        result.leads.to_csv(folder / LEADS_ARTIFACT, index=False)
        mlflow.log_artifact(str(folder / LEADS_ARTIFACT))
        mlflow.log_text(json.dumps(result.origins, indent=2), "origins.json")
        return parent.info.run_id
