"""Baselines trained on the same splits: LightGBM, BG/NBD (pymc-marketing) and an RFM rule.

Each has ``predict(frame) -> Predictions``, so the evaluation and the gate treat them alike.
"""

from __future__ import annotations

import logging

import lightgbm as lgb
import numpy as np
import pandas as pd

from ml.data import CATEGORICAL_COLUMNS, TIERS, tier_index
from ml.evaluate import Predictions, coherent_tiers, fit_tier_weights

log = logging.getLogger(__name__)


LIGHTGBM_PARAMS = {
    "n_estimators": 400,
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_child_samples": 20,
    "subsample": 0.9,
    "subsample_freq": 1,
    "colsample_bytree": 0.9,
    "verbose": -1,
    "n_jobs": 2,
    "deterministic": True,
    "force_row_wise": True,
}
# The churn model's trees have four leaves: churn is a noisy yes/no that a few smooth signals
# (recency, frequency, tenure) carry, and deeper trees learn the customers of the training
# cutoffs rather than the pattern. On the rolling backtest 31 leaves (the tier model's, which
# needs the interactions) gave churn ROC-AUC 0.741 on Online Retail and 0.850 on the demo
# shop, four leaves 0.754 and 0.856 (BENCHMARKS.md).
CHURN_LEAVES = 4


class LightGBMBaseline:
    """Two gradient-boosted models on customer_features: tier (class-balanced) and churn.

    What it publishes (``predict``) is coherent, as the ensembles' is: ``p_lapsed`` is its
    churn probability (lapsed is churned; ``ml.evaluate.coherent_tiers``), high and active
    share the rest in the tier model's ratio, and the tier is chosen with decision weights
    fitted on the validation cutoff for macro-F1. The churn probability is the churn model's
    own (log loss): a Platt scaling fitted on the validation cutoff made it worse on the later
    cutoffs of the rolling backtest (expected calibration error 0.069 to 0.083 on Online
    Retail, 0.015 to 0.023 on the demo shop; BENCHMARKS.md). Inside an ensemble it gives its
    own outputs (``raw``). A model pickled before 2026-11-28 publishes those, as it did."""

    name = "lightgbm"

    def __init__(
        self,
        numeric: list[str],
        seed: int,
        categorical: tuple[str, ...] = CATEGORICAL_COLUMNS,
        name: str = "lightgbm",
    ) -> None:
        self.numeric, self.seed = numeric, seed
        self.categorical, self.name = tuple(categorical), name
        self.categories: dict[str, list[str]] = {}
        self.tier_model: lgb.LGBMClassifier | None = None
        self.churn_model: lgb.LGBMClassifier | None = None

    def _matrix(self, frame: pd.DataFrame) -> pd.DataFrame:
        matrix = frame[self.numeric].astype("float64").copy()
        for column in getattr(self, "categorical", CATEGORICAL_COLUMNS):
            matrix[column] = pd.Categorical(
                frame[column].astype("string"), categories=self.categories[column]
            )
        return matrix

    def fit(self, train: pd.DataFrame, validation: pd.DataFrame) -> LightGBMBaseline:
        self.categories = {
            c: sorted(train[c].dropna().astype(str).unique()) for c in self.categorical
        }
        x_train, x_val = self._matrix(train), self._matrix(validation)
        common = {**LIGHTGBM_PARAMS, "random_state": self.seed}
        stop = [lgb.early_stopping(30, verbose=False)]
        self.tier_model = lgb.LGBMClassifier(
            objective="multiclass", class_weight="balanced", **common
        )
        self.tier_model.fit(
            x_train,
            tier_index(train["value_tier"]),
            eval_X=(x_val,),
            eval_y=(tier_index(validation["value_tier"]),),
            callbacks=stop,
        )
        self.churn_model = lgb.LGBMClassifier(
            objective="binary", **{**common, "num_leaves": CHURN_LEAVES}
        )
        self.churn_model.fit(
            x_train,
            train["is_churned"].astype(int),
            eval_X=(x_val,),
            eval_y=(validation["is_churned"].astype(int),),
            callbacks=stop,
        )
        raw = self.raw(validation)
        self.coherent = True
        self.tier_weights = fit_tier_weights(
            coherent_tiers(raw.tier_probs, raw.churn_prob), tier_index(validation["value_tier"])
        )
        return self

    def raw(self, frame: pd.DataFrame) -> Predictions:
        """The two models' own outputs: the churn model's probability, the tier model's
        class-balanced probabilities."""
        x = self._matrix(frame)
        tier_probs = self.tier_model.predict_proba(x)
        churn = self.churn_model.predict_proba(x)[:, 1]
        return Predictions(churn, tier_probs, tier_probs[:, TIERS.index("high")])

    def predict(self, frame: pd.DataFrame) -> Predictions:
        raw = self.raw(frame)
        if not getattr(self, "coherent", False):  # pickled before 2026-11-28: as it was
            return raw
        tiers = coherent_tiers(raw.tier_probs, raw.churn_prob)
        return Predictions(raw.churn_prob, tiers, tiers[:, TIERS.index("high")], self.tier_weights)


class BGNBDBaseline:
    """BG/NBD on (frequency, recency, T): churn = P(no purchase within the horizon).

    Fitted with pymc-marketing's ``BetaGeoModel`` (MAP); predictions use the fitted r, alpha,
    a, b in closed form, exactly as pymc-marketing 0.18 computes them
    (``expected_probability_no_purchase``: Hardie's note 039, eq. 34; ``expected_purchases``:
    Fader, Hardie & Lee, 2005, eq. 10), so a fitted model is four numbers that pickle and
    score without pymc. Noticed and kept, to stay the library's baseline: for customers with
    no repeat purchase pymc-marketing applies the x > 0 form of eq. 34 (the textbook gives
    ((alpha + T) / (alpha + T + t))^r there); on Online Retail its form ranks churn slightly
    better (mean backtest ROC-AUC 0.746 against 0.744)."""

    name = "bg_nbd"

    def __init__(self, horizon_days: int) -> None:
        self.horizon_days = horizon_days
        self.params: dict[str, float] = {}

    @staticmethod
    def rfm(frame: pd.DataFrame) -> pd.DataFrame:
        """BTYD inputs in days: repeat purchases, first-to-last purchase, age."""
        age = frame["first_order_days_ago"].astype("float64").clip(lower=1.0)
        recency = (age - frame["recency_days"].astype("float64")).clip(lower=0.0)
        return pd.DataFrame(
            {
                "customer_id": np.arange(len(frame)),
                "frequency": (frame["frequency"].astype("float64") - 1).clip(lower=0.0),
                "recency": recency,
                "T": np.maximum(age, recency),
            }
        )

    def fit(self, train: pd.DataFrame) -> BGNBDBaseline:
        from pymc_marketing.clv import BetaGeoModel

        model = BetaGeoModel(data=self.rfm(train))
        model.fit(method="map", progressbar=False)
        posterior = model.idata.posterior
        self.params = {k: float(posterior[k].mean()) for k in ("r", "alpha", "a", "b")}
        # The customer its reason codes start from (ml.reasons.btyd_shapley): the medians.
        self.reference = {
            c: float(train[c].astype("float64").median())
            for c in ("frequency", "recency_days", "first_order_days_ago")
        }
        return self

    def _alive(self, x: np.ndarray, t_x: np.ndarray, big_t: np.ndarray) -> np.ndarray:
        r, alpha, a, b = (self.params[k] for k in ("r", "alpha", "a", "b"))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            odds = (a / (b + x - 1)) * ((alpha + big_t) / (alpha + t_x)) ** (r + x)
        return np.where(x > 0, 1.0 / (1.0 + np.where(x > 0, odds, 0.0)), 1.0)

    def predict(self, frame: pd.DataFrame) -> Predictions:
        from scipy.special import betaln, hyp2f1

        data = self.rfm(frame)
        x, t_x, big_t = (data[c].to_numpy() for c in ("frequency", "recency", "T"))
        r, alpha, a, b = (self.params[k] for k in ("r", "alpha", "a", "b"))
        t = float(self.horizon_days)
        alive = self._alive(x, t_x, big_t)
        stay = ((alpha + big_t) / (alpha + big_t + t)) ** (r + x)
        # eq. 34 as pymc-marketing evaluates it, in log space.
        k_e = betaln(a + 1, b + x - 1) - (r + x) * np.log(alpha + t_x)
        k_f = betaln(a, b + x) - (r + x) * np.log(alpha + big_t + t)
        k_m = betaln(a, b + x) - (r + x) * np.log(alpha + big_t)
        k1, k2 = np.maximum(k_e, k_f), np.maximum(k_e, k_m)
        churn = (
            np.exp(k1 - k2)
            * (np.exp(k_e - k1) + np.exp(k_f - k1))
            / (np.exp(k_e - k2) + np.exp(k_m - k2))
        )
        # Expected purchases in (T, T + t], given alive or not (eq. 10 of Fader et al.).
        expected = (
            (a + b + x - 1)
            / (a - 1)
            * (1 - stay * hyp2f1(r + x, b + x, a + b + x - 1, t / (alpha + big_t + t)))
            * alive
        )
        value = expected * frame["avg_order_value"].fillna(0).to_numpy(dtype="float64")
        return Predictions(np.clip(churn, 0.0, 1.0), None, np.nan_to_num(value))


class RFMRuleBaseline:
    """The rule a marketer writes on day one: quintile scores and fixed cut-offs.

    Churn probability is the train churn rate of the customer's recency quintile; the tier is
    `lapsed` for the two stalest quintiles, `high` for top frequency and spend, else `active`.
    """

    name = "rfm_rule"

    def __init__(self) -> None:
        self.edges: dict[str, np.ndarray] = {}
        self.churn_by_recency: dict[int, float] = {}

    def _score(self, frame: pd.DataFrame, column: str) -> np.ndarray:
        return (
            np.digitize(frame[column].fillna(0).to_numpy(dtype="float64"), self.edges[column]) + 1
        )  # 1..5

    def fit(self, train: pd.DataFrame) -> RFMRuleBaseline:
        for column in ("recency_days", "frequency", "monetary_value"):
            self.edges[column] = np.unique(
                np.quantile(train[column].fillna(0), [0.2, 0.4, 0.6, 0.8])
            )
        recency = self._score(train, "recency_days")
        churned = train["is_churned"].to_numpy(dtype="float64")
        self.churn_by_recency = {
            int(r): float(churned[recency == r].mean()) for r in np.unique(recency)
        }
        return self

    def predict(self, frame: pd.DataFrame) -> Predictions:
        recency = self._score(frame, "recency_days")
        frequency = self._score(frame, "frequency")
        monetary = self._score(frame, "monetary_value")
        overall = float(np.mean(list(self.churn_by_recency.values())))
        churn = np.array([self.churn_by_recency.get(int(r), overall) for r in recency])
        tier = np.where(recency >= 4, 2, np.where((frequency >= 4) & (monetary >= 5), 0, 1))
        tier_probs = np.eye(len(TIERS))[tier]
        return Predictions(churn, tier_probs, monetary * 10.0 - recency)
