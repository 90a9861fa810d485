"""Uplift: which action pays for which customer, learned from the randomised campaigns.

The model in use is :class:`CellLearner`: window revenue as orders x value. A Poisson
LightGBM predicts each customer's orders without a campaign; an action's effect on orders is
measured per cell of customers (quantile bins of churn risk, value and promotion appetite) as
the mean residual of its treated customers against the same cell's randomised controls, with a
standard error; a regressor gives the value of an order, with the action's known discount taken
off. Its expected incremental profit is ``margin x effect - contact cost``. The policy
(:func:`choose`, and the dbt model ``scored_customers``) keeps the playbook's action unless
another one gains more than ``VALUELOOP_UPLIFT_CONFIDENCE_Z`` standard errors over it, and
takes no action when none pays.

The per-customer meta-learners it was chosen against are kept for the benchmark
(benchmarks/loop_policy.py --learner): :class:`OrdersLearner` (the same orders x value split
with the arm as a feature of one Poisson LightGBM, an S-learner in the sense of Künzel et al.,
2019), the plain T-learner (one revenue regressor per arm, causalml's ``BaseTRegressor``), an
S-learner and purchase-probability variants. On a few thousand noisy outcomes they chased
noise, and a policy following them lost up to two thirds of the playbook's profit on one seed;
BENCHMARKS.md has the numbers. causalml itself cannot be installed beside this stack (0.18
requires black>=26, whose pathspec>=1 conflicts with dbt-core 1.11, and the older 0.15 pulls
xgboost with NCCL's CUDA libraries).

Training uses matured outcome windows only (``intermediate.int_campaign_results`` with the
features frozen at planning time, ``marts.campaign_customer_features``). A fixed fifth of the
customers (by a hash of their key) is held out; the model fitted on the other four fifths is
judged there by each action's **Qini coefficient** (area between the Qini curve of
incremental revenue and the random line, per customer) and **AUUC**, logged with the plots.

The gate (:func:`policy_lead`, :func:`gate_decision`) judges what the model would change: the
policy. On the customers the next campaign would act on (the published scores), the
challenger's policy and the incumbent's (the champion's, or the playbook before there is
one) each pick their actions as the platform would; the difference in profit is measured on
the held-out randomised outcomes alone, with a paired 95% interval over resamples of the
held-out customers. A champion is weighed only on the held-out outcomes of campaigns it did
not learn from: its actions were picked on the noise of its own. ``VALUELOOP_UPLIFT_GATE``
says what it asks:

- ``guardrail`` (the default): promote unless the challenger's policy loses beyond the
  noise. At the demo's scale (10,000 customers) no holdout can confirm a gain of the size
  the policy makes: on the benchmark the true gains were -0.06 to +0.07 a customer, the
  held-out intervals 0.71 wide on average, and a gate asking for a gain beyond them promoted
  none of 18 seeds x cycles (the gate before this one, on mean Qini, none in six cycles of
  the demo). The protection against noise is the policy's own rule instead, which departs
  from the playbook's action only where all the randomised outcomes show a gain beyond
  ``VALUELOOP_UPLIFT_CONFIDENCE_Z`` standard errors (:func:`choose`; from no action, a
  message without a discount needs only a positive expected profit).
- ``superiority``: promote only when the gain is beyond the noise (the customer model's
  kind of gate), for shops with the outcomes to show it.

The model registered (and deployed, if promoted) is the same learner refitted on every
outcome: on the benchmark, deploying the four-fifths fit earned about half the refit's
lead over the playbook (BENCHMARKS.md, "The uplift gate").
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from lightgbm import LGBMRegressor
from mlflow import MlflowClient
from mlflow.models import infer_signature

from ml import registry
from ml.uplift_features import UPLIFT_FEATURES

log = logging.getLogger(__name__)

UPLIFT_MODEL = "valueloop-uplift-model"
UPLIFT_EXPERIMENT = "valueloop-uplift"
CONTROL = "control"
HOLDOUT_SHARE = 0.2
FEATURES = UPLIFT_FEATURES  # frozen per campaign customer at planning time
MIN_ARM = 30  # fewest customers an action (or control) needs in training to get a model
CELL_TABLE_COLUMNS = ("effect", "std_error", "control_std_error")
GATE_BOOTSTRAP = 200  # the gate's resamples of the held-out customers (0: point estimate only)


def load_outcomes(warehouse: Path) -> pd.DataFrame:
    """Matured randomised outcomes with the features frozen at planning time."""
    from valueloop.warehouse import connect  # the platform's, not the registered model's

    features = ", ".join(f"features.{f}" for f in FEATURES)
    with connect(warehouse) as con:
        return con.execute(
            f"""
            select results.campaign_id, results.customer_key, results.action,
                results.group_name, results.orders, results.revenue, results.purchased,
                results.unsubscribed,
                {features}
            from intermediate.int_campaign_results as results
            inner join marts.campaign_customer_features as features
                using (campaign_id, customer_key)
            where results.is_matured
            order by results.campaign_id, results.customer_key
            """
        ).df()


def arm(frame: pd.DataFrame) -> np.ndarray:
    return np.where(frame["group_name"] == "control", CONTROL, frame["action"]).astype(object)


def arms_to_fit(frame: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Each row's arm, and the arms with at least MIN_ARM customers; too few controls raise."""
    arms = arm(frame)
    counts = pd.Series(arms).value_counts()
    if counts.get(CONTROL, 0) < MIN_ARM:
        raise ValueError(
            f"only {counts.get(CONTROL, 0)} control customers with matured outcomes;"
            f" an uplift model needs at least {MIN_ARM}"
        )
    return arms, sorted(a for a, n in counts.items() if n >= MIN_ARM)


def holdout_mask(frame: pd.DataFrame) -> np.ndarray:
    """A fixed share of customers, by key, whatever the campaign: the same holdout each time."""
    from valueloop.campaigns import unit_hash

    return np.array([unit_hash("uplift-holdout", k) < HOLDOUT_SHARE for k in frame["customer_key"]])


class TLearner:
    """Per-arm LightGBM regressors of window revenue (see module doc)."""

    def __init__(self, seed: int = 42) -> None:
        self.seed = seed
        self.models: dict[str, LGBMRegressor] = {}

    params: ClassVar[dict] = {
        "n_estimators": 150,
        "learning_rate": 0.05,
        "num_leaves": 8,
        "min_child_samples": 20,
        "subsample": 0.8,
        "subsample_freq": 1,
        "reg_lambda": 1.0,
    }

    def _x(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The features this model was fitted on (frozen at fit: FEATURES may grow later; a
        model pickled before they were recorded says them through its fitted LightGBM)."""
        if not getattr(self, "features", None):
            models = getattr(self, "models", None) or {}
            fitted = getattr(self, "value_model", None) or next(iter(models.values()), None)
            names = getattr(fitted, "feature_name_", None)
            self.features = tuple(n for n in names if n != "arm") if names else tuple(FEATURES)
        return frame[list(self.features)].astype("float64")

    def _regressor(self) -> LGBMRegressor:
        return LGBMRegressor(**self.params, random_state=self.seed, verbose=-1, n_jobs=1)

    def fit(self, frame: pd.DataFrame) -> TLearner:
        arms, _ = arms_to_fit(frame)
        x = self._x(frame)
        y = frame["revenue"].astype("float64").to_numpy()
        for name in sorted(set(arms)):
            chosen = arms == name
            if chosen.sum() >= MIN_ARM:
                self.models[name] = self._regressor().fit(x[chosen], y[chosen])
        return self

    @property
    def actions(self) -> list[str]:
        return sorted(a for a in self.models if a != CONTROL)

    def base_revenue(self, frame: pd.DataFrame) -> np.ndarray:
        """Expected window revenue of each customer without a campaign."""
        return self.models[CONTROL].predict(self._x(frame))

    def effects(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Expected revenue effect of each action on each customer (columns: actions)."""
        x = self._x(frame)
        base = self.models[CONTROL].predict(x)
        return pd.DataFrame(
            {a: self.models[a].predict(x) - base for a in self.actions}, index=frame.index
        )


class SLearner(TLearner):
    """One LightGBM regressor of window revenue on the features and the arm (categorical):
    every arm's data shapes one model, so effects borrow strength across arms."""

    def _design(self, x: pd.DataFrame, arms: np.ndarray) -> pd.DataFrame:
        design = x.reset_index(drop=True).copy()
        design["arm"] = pd.Categorical(arms, categories=self.arms)
        return design

    def fit(self, frame: pd.DataFrame) -> SLearner:
        arms, self.arms = arms_to_fit(frame)
        keep = np.isin(arms, self.arms)
        x = self._x(frame)[keep]
        model = LGBMRegressor(
            n_estimators=300,
            learning_rate=0.03,
            num_leaves=15,
            min_child_samples=40,
            subsample=0.8,
            subsample_freq=1,
            reg_lambda=5.0,
            random_state=self.seed,
            verbose=-1,
            n_jobs=1,
        )
        self.model = model.fit(
            self._design(x, arms[keep]), frame["revenue"].astype("float64").to_numpy()[keep]
        )
        self.models = {a: self.model for a in self.arms}
        return self

    def base_revenue(self, frame: pd.DataFrame) -> np.ndarray:
        x = self._x(frame).reset_index(drop=True)
        return self.model.predict(self._design(x, np.full(len(x), CONTROL, object)))

    def effects(self, frame: pd.DataFrame) -> pd.DataFrame:
        x = self._x(frame).reset_index(drop=True)
        n = len(x)
        base = self.model.predict(self._design(x, np.full(n, CONTROL, object)))
        return pd.DataFrame(
            {
                a: self.model.predict(self._design(x, np.full(n, a, object))) - base
                for a in self.actions
            },
            index=frame.index,
        )


class TwoPartLearner(TLearner):
    """Revenue = P(buy) x value: a LightGBM classifier of buying in the window per arm (the
    part campaigns move, and far less noisy than revenue), and one regressor of window revenue
    given a purchase, pooled over every arm's buyers, discounted by the action's known price
    cut (the catalogue's ``discount``). Effect of action a on a customer:
    ``value(x) x (P_a(x) x (1 - discount_a) - P_control(x))``."""

    classifier_params: ClassVar[dict] = {
        "n_estimators": 120,
        "learning_rate": 0.05,
        "num_leaves": 8,
        "min_child_samples": 40,
        "subsample": 0.8,
        "subsample_freq": 1,
        "reg_lambda": 5.0,
    }

    def __init__(self, seed: int = 42, discounts: dict[str, float] | None = None) -> None:
        super().__init__(seed)
        self.discounts = discounts or {}

    def fit(self, frame: pd.DataFrame) -> TwoPartLearner:
        from lightgbm import LGBMClassifier

        arms, _ = arms_to_fit(frame)
        x = self._x(frame)
        revenue = frame["revenue"].astype("float64").to_numpy()
        bought = revenue > 0
        for name in sorted(set(arms)):
            chosen = arms == name
            labels = bought[chosen]
            if chosen.sum() >= MIN_ARM and 0 < labels.sum() < len(labels):
                self.models[name] = LGBMClassifier(
                    **self.classifier_params, random_state=self.seed, verbose=-1, n_jobs=1
                ).fit(x[chosen], labels.astype(int))
        # Value given a purchase: undo each arm's discount so all buyers speak one currency.
        undiscounted = revenue / (1 - np.array([self.discounts.get(a, 0.0) for a in arms]))
        self.value_model = self._regressor().fit(x[bought], undiscounted[bought])
        return self

    def base_revenue(self, frame: pd.DataFrame) -> np.ndarray:
        x = self._x(frame)
        value = np.clip(self.value_model.predict(x), 0, None)
        return value * self.models[CONTROL].predict_proba(x)[:, 1]

    def effects(self, frame: pd.DataFrame) -> pd.DataFrame:
        x = self._x(frame)
        value = np.clip(self.value_model.predict(x), 0, None)
        base = self.models[CONTROL].predict_proba(x)[:, 1]
        return pd.DataFrame(
            {
                a: value
                * (self.models[a].predict_proba(x)[:, 1] * (1 - self.discounts.get(a, 0.0)) - base)
                for a in self.actions
            },
            index=frame.index,
        )


class PooledTwoPartLearner(TwoPartLearner):
    """TwoPartLearner with one purchase classifier for all arms (the arm a categorical
    feature, as in an S-learner): every arm's customers shape the shared trees, and an arm's
    own trees only where the data shows it differs."""

    def fit(self, frame: pd.DataFrame) -> PooledTwoPartLearner:
        from lightgbm import LGBMClassifier

        arms, self.arms = arms_to_fit(frame)
        keep = np.isin(arms, self.arms)
        x = self._x(frame)
        revenue = frame["revenue"].astype("float64").to_numpy()
        bought = revenue > 0
        self.classifier = LGBMClassifier(
            **self.classifier_params, random_state=self.seed, verbose=-1, n_jobs=1
        ).fit(self._design(x[keep], arms[keep]), bought[keep].astype(int))
        self.models = {a: self.classifier for a in self.arms}
        undiscounted = revenue / (1 - np.array([self.discounts.get(a, 0.0) for a in arms]))
        self.value_model = self._regressor().fit(x[bought], undiscounted[bought])
        return self

    _design = SLearner._design

    def base_revenue(self, frame: pd.DataFrame) -> np.ndarray:
        x = self._x(frame).reset_index(drop=True)
        value = np.clip(self.value_model.predict(x), 0, None)
        design = self._design(x, np.full(len(x), CONTROL, object))
        return value * self.classifier.predict_proba(design)[:, 1]

    def effects(self, frame: pd.DataFrame) -> pd.DataFrame:
        x = self._x(frame).reset_index(drop=True)
        n = len(x)
        value = np.clip(self.value_model.predict(x), 0, None)

        def p(name: str) -> np.ndarray:
            return self.classifier.predict_proba(self._design(x, np.full(n, name, object)))[:, 1]

        base = p(CONTROL)
        return pd.DataFrame(
            {a: value * (p(a) * (1 - self.discounts.get(a, 0.0)) - base) for a in self.actions},
            index=frame.index,
        )


class OrdersLearner(PooledTwoPartLearner):
    """Revenue = orders x value per order. One Poisson LightGBM of the number of orders in the
    window for all arms (the arm a categorical feature), so an action that brings an extra
    order from a customer who buys anyway counts as well as one that wins a customer back; and
    one regressor of the value of an order, pooled over every buyer, with the action's known
    discount taken off. Effect of action a:
    ``value(x) x (orders_a(x) x (1 - discount_a) - orders_control(x))``."""

    orders_params: ClassVar[dict] = {
        "objective": "poisson",
        "n_estimators": 150,
        "learning_rate": 0.05,
        "num_leaves": 8,
        "min_child_samples": 40,
        "subsample": 0.8,
        "subsample_freq": 1,
        "reg_lambda": 5.0,
    }

    def fit(self, frame: pd.DataFrame) -> OrdersLearner:
        arms, self.arms = arms_to_fit(frame)
        keep = np.isin(arms, self.arms)
        x = self._x(frame)
        orders = frame["orders"].astype("float64").to_numpy()
        revenue = frame["revenue"].astype("float64").to_numpy()
        self.orders_model = LGBMRegressor(
            **self.orders_params, random_state=self.seed, verbose=-1, n_jobs=1
        ).fit(self._design(x[keep], arms[keep]), orders[keep])
        self.models = {a: self.orders_model for a in self.arms}
        bought = (orders > 0) & (revenue > 0)
        per_order = revenue / np.maximum(orders, 1)
        per_order = per_order / (1 - np.array([self.discounts.get(a, 0.0) for a in arms]))
        self.value_model = self._regressor().fit(x[bought], per_order[bought])
        return self

    def base_revenue(self, frame: pd.DataFrame) -> np.ndarray:
        x = self._x(frame).reset_index(drop=True)
        value = np.clip(self.value_model.predict(x), 0, None)
        return value * self.orders_model.predict(self._design(x, np.full(len(x), CONTROL, object)))

    def effects(self, frame: pd.DataFrame) -> pd.DataFrame:
        x = self._x(frame).reset_index(drop=True)
        n = len(x)
        value = np.clip(self.value_model.predict(x), 0, None)

        def orders(name: str) -> np.ndarray:
            return self.orders_model.predict(self._design(x, np.full(n, name, object)))

        base = orders(CONTROL)
        return pd.DataFrame(
            {
                a: value * (orders(a) * (1 - self.discounts.get(a, 0.0)) - base)
                for a in self.actions
            },
            index=frame.index,
        )


class CellLearner(OrdersLearner):
    """The model in use: incremental orders per cell of customers, measured against the
    randomised controls of the same cell, with a standard error the policy can respect.

    * A Poisson LightGBM of window orders on the features (all arms, 5-fold cross-fitted)
      predicts each customer's orders without a campaign; the residual (orders minus that) is
      what an action can move, with the customer's predictable variation taken out.
    * Cells are quantile bins, fitted on the outcomes, of churn risk, value and promotion
      appetite (``CELL_BINS``: 4 x 3 x 3). An action's effect in a cell is the mean residual
      of its treated customers minus that of the cell's controls (pooled over actions:
      randomised, so comparable given the cell), with its standard error; a cell with too few
      of either falls back to the action's effect over all cells, its error widened by the
      spread of the cell effects.
    * The means are weighted by the inverse of each customer's expected orders (at least
      ``VARIANCE_FLOOR``), the variance of a Poisson count: an extra order from a customer
      who rarely buys stands out, one from a customer who buys every week is lost in their
      own noise. Treated and controls are weighted alike, so the randomisation still holds;
      the effect measured is the weighted one, leaning to the quieter customers of a cell.
    * Revenue effect = value per order x (orders with the action x (1 - its known discount)
      - orders without); the value per order as in :class:`OrdersLearner`.
    * Unsubscribes per contact, per action and cell (:meth:`unsubscribe_rates`), which the
      policy charges at the shop's cost of an unsubscribe (:func:`unsubscribe_costs`).

    Coarser than a per-customer model, and that is the point: on the demo market (benchmarks/
    loop_policy.py) per-customer learners chased noise in a few thousand outcomes and could
    lose most of the playbook's profit; this one, with the policy departing from the playbook
    only on a gain larger than its uncertainty (:func:`choose`), does not."""

    CELL_BINS: ClassVar[dict[str, int]] = {
        "churn_probability": 4,
        "p_high": 3,
        "discounted_line_share": 3,
    }
    MIN_CELL = 10  # fewest treated and control customers a cell needs for its own estimate
    FOLDS = 5
    VARIANCE_FLOOR = 0.05  # expected orders below which a customer's weight stops growing
    UNSUBSCRIBE_PRIOR = 50  # pseudo-customers at the action's overall rate in each cell

    def _cells(self, frame: pd.DataFrame) -> np.ndarray:
        key = np.zeros(len(frame), dtype=np.int64)
        for column, edges in self.edges.items():
            values = frame[column].astype("float64").fillna(self.medians[column]).to_numpy()
            key = key * 10 + np.digitize(values, edges)
        return key

    def fit(self, frame: pd.DataFrame) -> CellLearner:
        # the campaigns learned from: the gate weighs this model, as incumbent, on others only
        self.campaigns = (
            frozenset(frame["campaign_id"].astype(str)) if "campaign_id" in frame else None
        )
        arms, self.arms = arms_to_fit(frame)
        keep = np.isin(arms, self.arms)
        frame, arms = frame[keep].reset_index(drop=True), arms[keep]
        x = self._x(frame)
        orders = frame["orders"].astype("float64").to_numpy()
        expected = np.zeros(len(frame))
        fold = np.random.default_rng(self.seed).permutation(len(frame)) % self.FOLDS
        for k in range(self.FOLDS):
            model = LGBMRegressor(**self.orders_params, random_state=self.seed, verbose=-1)
            model.set_params(n_jobs=1)
            expected[fold == k] = model.fit(x[fold != k], orders[fold != k]).predict(x[fold == k])
        self.orders_model = LGBMRegressor(
            **self.orders_params, random_state=self.seed, verbose=-1, n_jobs=1
        ).fit(x, orders)
        self.edges = {
            c: np.unique(np.nanquantile(frame[c].astype("float64"), np.linspace(0, 1, k + 1)[1:-1]))
            for c, k in self.CELL_BINS.items()
        }
        self.medians = {c: float(frame[c].astype("float64").median()) for c in self.CELL_BINS}
        residual = orders - expected
        # Inverse-variance weights: window orders are Poisson-like, so a customer expected to
        # order often brings more noise than signal to an effect of a fraction of an order.
        weight = 1.0 / np.clip(expected, self.VARIANCE_FLOOR, None)
        data = pd.DataFrame({"cell": self._cells(frame), "arm": arms, "r": residual, "w": weight})
        self.cell_effects, self.overall = self._measure(data)
        self.models = {a: self.orders_model for a in self.arms}
        self._fit_value(frame, arms, orders)
        self._fit_unsubscribes(frame, arms, data["cell"].to_numpy())
        return self

    def _measure(
        self, data: pd.DataFrame
    ) -> tuple[dict[str, pd.DataFrame], dict[str, tuple[float, float]]]:
        """Per action: each cell's effect on orders against the cell's controls, with its
        standard error (cells with ``MIN_CELL`` treated and controls), and the action's effect
        over all cells, from residual orders ``r`` weighted by ``w`` per ``cell`` and ``arm``."""
        stats = _weighted_means(data, ["arm", "cell"])
        arms = set(stats.index.get_level_values("arm"))
        if CONTROL not in arms:
            raise ValueError("no control customers to measure the actions against")
        control = stats.loc[CONTROL]
        control_all = _weighted_means(data[data["arm"] == CONTROL].assign(all=0), ["all"]).iloc[0]
        cell_effects: dict[str, pd.DataFrame] = {}
        overall: dict[str, tuple[float, float]] = {}
        for action in (a for a in self.arms if a != CONTROL):
            if action not in arms:  # none of this action's customers among ``data``
                cell_effects[action] = pd.DataFrame(
                    {c: pd.Series(dtype="float64") for c in CELL_TABLE_COLUMNS}
                )
                overall[action] = (0.0, float("inf"))
                continue
            treated = _weighted_means(data[data["arm"] == action].assign(all=0), ["all"]).iloc[0]
            effect = treated["mean"] - control_all["mean"]
            effect_se = np.sqrt(treated["variance"] + control_all["variance"])
            cells = stats.loc[action].merge(
                control, left_index=True, right_index=True, suffixes=("", "_control")
            )
            cells = cells[
                (cells["size"] >= self.MIN_CELL) & (cells["size_control"] >= self.MIN_CELL)
            ]
            table = pd.DataFrame(
                {
                    "effect": cells["mean"] - cells["mean_control"],
                    "std_error": np.sqrt(cells["variance"] + cells["variance_control"]),
                    # the part of it every action of the cell shares: its controls' mean
                    "control_std_error": np.sqrt(cells["variance_control"]),
                }
            )
            spread = float(table["effect"].var()) if len(table) > 1 else 0.0
            cell_effects[action] = table
            overall[action] = (float(effect), float(np.sqrt(effect_se**2 + spread)))
        return cell_effects, overall

    def residuals(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Outcomes this model did not learn from, as :meth:`_measure` reads them: each row's
        cell, arm, residual orders against the fitted orders model, and weight."""
        frame = frame.reset_index(drop=True)
        expected = np.clip(self.orders_model.predict(self._x(frame)), 0, None)
        return pd.DataFrame(
            {
                "cell": self._cells(frame),
                "arm": arm(frame),
                "r": frame["orders"].astype("float64").to_numpy() - expected,
                "w": 1.0 / np.clip(expected, self.VARIANCE_FLOOR, None),
            }
        )

    def remeasured(self, data: pd.DataFrame) -> CellLearner:
        """This model with its cells' effects measured again on ``data`` (from
        :meth:`residuals`): the same cells, order values and baseline, other evidence."""
        other = copy.copy(self)
        other.cell_effects, other.overall = self._measure(data)
        return other

    def _fit_unsubscribes(self, frame: pd.DataFrame, arms: np.ndarray, cells: np.ndarray) -> None:
        """Per action and cell, the share of treated customers who unsubscribed, shrunk toward
        the action's share over all cells by ``UNSUBSCRIBE_PRIOR`` customers (controls are
        sent nothing, so only the treated tell). None for outcomes without the column."""
        self.unsubscribe_cells: dict[str, pd.Series] | None = None
        if "unsubscribed" not in frame:
            return
        flag = frame["unsubscribed"].fillna(False).astype("float64").to_numpy()
        data = pd.DataFrame({"arm": arms, "cell": cells, "u": flag})
        data = data[data["arm"] != CONTROL]
        self.unsubscribe_overall = data.groupby("arm")["u"].mean().to_dict()
        self.unsubscribe_cells = {}
        for action, group in data.groupby("arm"):
            cell = group.groupby("cell")["u"].agg(["sum", "size"])
            prior = self.UNSUBSCRIBE_PRIOR
            rate = (cell["sum"] + prior * self.unsubscribe_overall[action]) / (cell["size"] + prior)
            self.unsubscribe_cells[action] = rate

    def unsubscribe_rates(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Expected unsubscribes per customer sent each action (columns: actions): their
        cell's rate, else the action's over all cells; zero for a model fitted before
        unsubscribes were recorded."""
        frame = frame.reset_index(drop=True)
        cells = self._cells(frame)
        table = getattr(self, "unsubscribe_cells", None) or {}
        out = {}
        for action in self.actions:
            if action in table:
                rates = table[action].reindex(cells).fillna(self.unsubscribe_overall[action])
                out[action] = rates.to_numpy()
            else:
                out[action] = np.zeros(len(frame))
        return pd.DataFrame(out)

    def _fit_value(self, frame: pd.DataFrame, arms: np.ndarray, orders: np.ndarray) -> None:
        revenue = frame["revenue"].astype("float64").to_numpy()
        bought = (orders > 0) & (revenue > 0)
        per_order = revenue / np.maximum(orders, 1)
        per_order = per_order / (1 - np.array([self.discounts.get(a, 0.0) for a in arms]))
        self.value_model = self._regressor().fit(self._x(frame)[bought], per_order[bought])

    def _order_effects(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        cells = self._cells(frame)
        effect, error = {}, {}
        for action in self.actions:
            table = self.cell_effects[action].reindex(cells)
            fallback, fallback_se = self.overall[action]
            effect[action] = table["effect"].fillna(fallback).to_numpy()
            error[action] = table["std_error"].fillna(fallback_se).to_numpy()
        return pd.DataFrame(effect), pd.DataFrame(error)

    def base_revenue(self, frame: pd.DataFrame) -> np.ndarray:
        x = self._x(frame.reset_index(drop=True))
        value = np.clip(self.value_model.predict(x), 0, None)
        return value * np.clip(self.orders_model.predict(x), 0, None)

    def effects(self, frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.reset_index(drop=True)
        x = self._x(frame)
        value = np.clip(self.value_model.predict(x), 0, None)
        base = np.clip(self.orders_model.predict(x), 0, None)
        delta, _ = self._order_effects(frame)
        return pd.DataFrame(
            {
                a: value * ((base + delta[a]) * (1 - self.discounts.get(a, 0.0)) - base)
                for a in self.actions
            }
        )

    def std_errors(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Standard error of each revenue effect in :meth:`effects` (value x discounted
        standard error of the cell's incremental orders)."""
        frame = frame.reset_index(drop=True)
        value = np.clip(self.value_model.predict(self._x(frame)), 0, None)
        _, error = self._order_effects(frame)
        return pd.DataFrame(
            {a: value * (1 - self.discounts.get(a, 0.0)) * error[a] for a in self.actions}
        )

    def shared_std_errors(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The part of each revenue effect's standard error that comes from the cell's
        controls, which every action measured in that cell shares: two actions' estimates
        covary by the product of their shared parts, so the error of the *difference* between
        them is smaller than the two errors taken as independent (:func:`choose`). Zero where
        an action falls back to its effect over all cells (no shared part claimed: the
        conservative side), and for a model fitted before this was recorded."""
        frame = frame.reset_index(drop=True)
        value = np.clip(self.value_model.predict(self._x(frame)), 0, None)
        cells = self._cells(frame)
        shared = {}
        for action in self.actions:
            table = self.cell_effects[action]
            column = (
                table["control_std_error"]
                if "control_std_error" in table
                else pd.Series(0.0, index=table.index)
            )
            shared[action] = (
                value
                * (1 - self.discounts.get(action, 0.0))
                * column.reindex(cells).fillna(0.0).to_numpy()
            )
        return pd.DataFrame(shared)


def _weighted_means(data: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per group of ``data`` (columns r, w): the weighted mean of r, the variance of that mean
    (sum of w² (r - mean)² over (sum of w)², with the n / (n - 1) correction) and the size."""
    data = data.assign(wr=data["w"] * data["r"])
    groups = data.groupby(by)
    stats = pd.DataFrame({"sw": groups["w"].sum(), "swr": groups["wr"].sum()})
    stats["size"] = groups.size()
    stats["mean"] = stats["swr"] / stats["sw"]
    deviation = data["w"] * (data["r"] - data.join(stats["mean"], on=by)["mean"])
    spread = (deviation**2).groupby([data[c] for c in by]).sum()
    stats["variance"] = spread / stats["sw"] ** 2 * stats["size"] / np.maximum(stats["size"] - 1, 1)
    return stats[["mean", "variance", "size"]]


LEARNERS = {
    "cells": CellLearner,
    "orders": OrdersLearner,
    "t": TLearner,
    "s": SLearner,
    "twopart": TwoPartLearner,
    "pooled": PooledTwoPartLearner,
}


def unsubscribe_costs(model: TLearner, frame: pd.DataFrame, cost: float) -> pd.DataFrame | None:
    """``cost`` times each action's expected unsubscribes per customer (columns: actions), or
    None where there is no cost or the model does not estimate them."""
    if not cost or not hasattr(model, "unsubscribe_rates"):
        return None
    return cost * model.unsubscribe_rates(frame)


def discount_costs(
    model: TLearner, frame: pd.DataFrame, margin: float, effects: pd.DataFrame | None = None
) -> pd.DataFrame | None:
    """What each action's discount costs beyond ``margin`` x its revenue effect, per customer of
    ``frame`` (columns: the model's actions): a discount comes off the price, not off the
    cost of the goods, so on the orders placed with it the shop keeps ``margin - d`` of their
    list value, not ``margin`` of what was paid. That is ``(1 - margin) x d / (1 - d)`` x the
    revenue with the action (its base revenue plus its effect): a loyal customer given 15% off
    an order they would have placed anyway loses the shop the whole 15%, not 35% of it. None
    when no action has a discount (or the model does not know them)."""
    discounts = getattr(model, "discounts", None) or {}
    cut = {a: float(discounts.get(a, 0.0)) for a in model.actions}
    if not any(cut.values()):
        return None
    effects = model.effects(frame) if effects is None else effects
    with_action = effects.to_numpy() + np.asarray(model.base_revenue(frame))[:, None]
    factor = np.array([(1 - margin) * cut[a] / (1 - cut[a]) for a in effects.columns])
    return pd.DataFrame(np.clip(with_action, 0, None) * factor, columns=effects.columns)


def profit_error_scale(model: TLearner, margin: float) -> dict[str, float]:
    """Per action, profit per unit of revenue effect, which scales its errors: ``margin`` for
    an action without a discount; for one with discount d, an extra order is worth
    ``margin - d`` of its list value, ``1 - d`` of which is revenue, so ``(margin - d) /
    (1 - d)``. Signed: past the margin an extra order loses money, and the error it shares
    with other actions turns around (:func:`choose` takes the size for the errors)."""
    discounts = getattr(model, "discounts", None) or {}
    return {
        a: (margin - discounts.get(a, 0.0)) / (1 - discounts.get(a, 0.0)) for a in model.actions
    }


def choose(
    effects: pd.DataFrame,
    costs: dict[str, float],
    margin: float,
    eligible: list[list[str]] | None = None,
    playbook: np.ndarray | None = None,
    std_errors: pd.DataFrame | None = None,
    confidence_z: float = 0.0,
    shared_errors: pd.DataFrame | None = None,
    bounded: set[str] | frozenset[str] = frozenset(),
    unsubscribe_costs: pd.DataFrame | None = None,
    discount_costs: pd.DataFrame | None = None,
    error_scale: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per customer, the eligible action with the highest expected incremental profit, or
    ``no_action`` (profit 0) when none is positive; returns (actions, their expected
    incremental profit). Profit is ``margin`` x the revenue effect, less the contact cost and
    the expected cost of the unsubscribes the action causes (``unsubscribe_costs``, in the
    shop's currency per customer; see :func:`unsubscribe_costs`) and the margin its discount
    gives away (``discount_costs``, :func:`discount_costs`). ``error_scale`` turns each
    action's revenue error into a profit error (:func:`profit_error_scale`; ``margin`` for
    every action without it).

    With ``std_errors`` (of the revenue effects) and ``confidence_z``, the policy departs from
    the baseline (the ``playbook``'s action per customer, else no action) only where the gain
    over it is more than ``confidence_z`` standard errors of that gain. Two actions measured
    against the same controls share those controls' noise (``shared_errors``, the part of each
    error that comes from them): the error of the gain is
    ``sqrt(se_a² + se_b² - 2 shared_a shared_b)``, not the two errors taken as independent,
    which would charge a switch between two actions for noise that cancels in it. Without
    ``shared_errors`` they are taken as independent (conservative). A playbook action the model
    has no estimate for is kept.

    The threshold guards what the baseline earns. Where the baseline is no action, an action in
    ``bounded`` (one without a discount: it can lose at most its contact cost and the
    unsubscribes it causes, both counted in its expected profit, as a message or a perk does
    not take orders away) is taken on any positive expected profit: there the threshold would
    forgo that profit to guard against a loss no larger than those costs.
    Discounts and switches away from an action keep the threshold. The dbt model
    ``scored_customers`` applies the same rule."""
    profit = margin * effects - pd.Series(costs).reindex(effects.columns).to_numpy()
    for extra in (unsubscribe_costs, discount_costs):
        if extra is not None:
            profit = profit - extra[list(effects.columns)].to_numpy()
    columns = np.asarray([*effects.columns, "no_action"], dtype=object)
    n = len(profit)
    values = np.column_stack([profit.to_numpy(), np.zeros(n)])
    errors, shared = np.zeros_like(values), np.zeros_like(values)
    scale = np.array([(error_scale or {}).get(a, margin) for a in effects.columns])
    if std_errors is not None:
        errors[:, :-1] = np.abs(scale) * std_errors[list(effects.columns)].to_numpy()
    if shared_errors is not None:
        shared[:, :-1] = scale * shared_errors[list(effects.columns)].to_numpy()
    if eligible is not None:
        allowed = np.array([[a in e for a in effects.columns] for e in eligible], dtype=bool)
        values[:, :-1] = np.where(allowed.reshape(n, -1), values[:, :-1], -np.inf)
    rows = np.arange(n)
    baseline = np.full(n, len(columns) - 1)
    if playbook is not None:
        index = {a: i for i, a in enumerate(columns)}
        baseline = np.array([index.get(a, -1) for a in playbook], dtype=int)
    known = baseline >= 0
    base = np.where(known, baseline, 0)
    variance = (
        errors**2 + errors[rows, base][:, None] ** 2 - 2 * shared * shared[rows, base][:, None]
    )
    penalty = confidence_z * np.sqrt(np.clip(variance, 0, None))
    free = (
        np.array([a in bounded for a in columns])[None, :] & (baseline == len(columns) - 1)[:, None]
    )
    penalty = np.where(free, 0.0, penalty)
    score = values - penalty
    score[rows, base] = np.where(known, values[rows, base], score[rows, base])
    best = np.where(known, score.argmax(axis=1) if n else np.array([], int), -1)
    if playbook is not None:
        actions = np.where(best >= 0, columns[np.maximum(best, 0)], np.asarray(playbook, object))
    else:
        actions = columns[best]
    chosen = np.where(best >= 0, values[rows, np.maximum(best, 0)], np.nan) if n else np.array([])
    return actions, chosen


def expected_profits(
    model: TLearner,
    frame: pd.DataFrame,
    costs: dict[str, float],
    margin: float,
    unsubscribe_cost: float,
) -> pd.DataFrame:
    """Each action's expected incremental profit per customer of ``frame`` (columns: the
    model's actions): ``margin`` x the revenue effect, less the contact cost, the expected
    unsubscribes' cost (:func:`unsubscribe_costs`) and the margin a discount gives away
    (:func:`discount_costs`). Scoring publishes it; the gate weighs it."""
    effects = model.effects(frame)
    profit = margin * effects - pd.Series(costs).reindex(effects.columns).to_numpy()
    unsubscribes = unsubscribe_costs(model, frame, unsubscribe_cost)
    discounts = discount_costs(model, frame, margin, effects)
    for extra in (unsubscribes, discounts):
        if extra is not None:
            profit = profit - extra[list(effects.columns)].to_numpy()
    return profit


@dataclass(frozen=True)
class PolicyTarget:
    """The customers the next campaign would act on, with what the policy needs to decide
    for them as the platform does (dbt's ``scored_customers``; :func:`choose`)."""

    frame: pd.DataFrame  # the uplift features, one row per customer
    playbook: np.ndarray  # the playbook's action per customer
    eligible: list[list[str]]  # the actions each customer may get
    costs: dict[str, float]  # contact cost per action
    bounded: frozenset[str]  # actions without a discount (see :func:`choose`)
    margin: float
    confidence_z: float
    unsubscribe_cost: float

    def profits(self, model: TLearner) -> pd.DataFrame:
        """Each action's expected incremental profit per customer by ``model``."""
        return expected_profits(model, self.frame, self.costs, self.margin, self.unsubscribe_cost)

    def actions(self, model: TLearner | None) -> np.ndarray:
        """The action the policy of ``model`` picks per customer; the playbook's for None."""
        if model is None:
            return np.asarray(self.playbook, dtype=object)
        errors = model.std_errors(self.frame) if hasattr(model, "std_errors") else None
        shared = (
            model.shared_std_errors(self.frame) if hasattr(model, "shared_std_errors") else None
        )
        effects = model.effects(self.frame)
        return choose(
            effects,
            self.costs,
            self.margin,
            self.eligible,
            self.playbook,
            errors,
            self.confidence_z,
            shared,
            self.bounded,
            unsubscribe_costs(model, self.frame, self.unsubscribe_cost),
            discount_costs(model, self.frame, self.margin, effects),
            profit_error_scale(model, self.margin),
        )[0]


# A resample without a held-out control measures nothing; past this share of such resamples,
# no interval.
MIN_MEASURED_RESAMPLES = 0.95


def policy_lead(
    challenger: CellLearner,
    incumbent: TLearner | None,
    holdout: pd.DataFrame,
    target: PolicyTarget,
    n_resamples: int = GATE_BOOTSTRAP,
    seed: int = 0,
) -> tuple[float, float, float, int]:
    """What the challenger's policy would earn over the incumbent's (None: the playbook) on
    ``target``'s customers, per customer, measured on held-out randomised outcomes that
    neither model learned from; its 95% interval (NaN bounds when ``n_resamples`` is 0, or
    when more than one resample in twenty drew no control); and how many customers the two
    policies treat differently. Without such a held-out control the lead itself is NaN.

    The challenger (fitted without the held-out customers) learned from none of ``holdout``;
    an incumbent model learned from the campaigns it was fitted on (``campaigns``), held-out
    customers included, and its actions were picked on that noise. Weighed on those outcomes
    it would look better than it is (on the loop benchmark, 12 seeds: in the third cycle the
    gate read the challenger's lead 0.115 a customer below the truth, and refused two
    challengers that truly gained), so only the held-out outcomes of the other campaigns
    weigh it.

    Both policies pick their actions as the platform would (:meth:`PolicyTarget.actions`).
    Each action's profit for a customer is then measured on ``holdout`` alone, outcomes
    neither model learned from: the challenger's cells, order values and baseline, with the
    cells' effects measured again on the held-out treated and controls
    (:meth:`CellLearner.remeasured`). The interval resamples held-out *customers*, each with
    all their outcome rows, and measures again; the two policies' actions stay fixed."""
    ours, theirs = target.actions(challenger), target.actions(incumbent)
    differ = np.flatnonzero(ours != theirs)
    if not len(differ):
        return 0.0, 0.0, 0.0, 0
    # The incumbent's actions were picked on the noise of the outcomes it learned from, so
    # on those it looks better than it is: only other campaigns' held-out outcomes weigh it.
    # (A champion registered before models recorded their campaigns is weighed on them all.)
    seen = getattr(incumbent, "campaigns", None)
    if seen:
        holdout = holdout[~holdout["campaign_id"].astype(str).isin(seen)]
    holdout = holdout.reset_index(drop=True)
    if holdout.empty:
        return float("nan"), float("nan"), float("nan"), len(differ)
    evidence = challenger.residuals(holdout)
    actions = list(challenger.actions)
    column = {a: j for j, a in enumerate(actions)}
    pick = [np.array([column.get(a, -1) for a in p[differ]]) for p in (ours, theirs)]
    subset = replace(target, frame=target.frame.iloc[differ].reset_index(drop=True))
    n = len(target.frame)

    controls = (evidence["arm"] == CONTROL).to_numpy()

    def lead(rows: np.ndarray) -> float:
        if not controls[rows].any():  # nothing to measure the actions against
            return float("nan")
        model = challenger.remeasured(evidence.iloc[rows])
        profit = np.column_stack([subset.profits(model)[actions].to_numpy(), np.zeros(len(differ))])
        gained = [profit[np.arange(len(differ)), p] for p in pick]  # -1: no action, 0
        return float((gained[0] - gained[1]).sum() / n)

    point = lead(np.arange(len(evidence)))
    if n_resamples <= 0:
        return point, float("nan"), float("nan"), len(differ)
    rng = np.random.default_rng(seed)
    _, customer = np.unique(holdout["customer_key"].to_numpy(object), return_inverse=True)
    order = np.argsort(customer, kind="stable")
    rows_of = np.split(order, np.flatnonzero(np.diff(customer[order])) + 1)
    leads = []
    for _ in range(n_resamples):
        drawn = rng.integers(0, len(rows_of), len(rows_of))
        leads.append(lead(np.concatenate([rows_of[c] for c in drawn])))
    finite = np.array(leads)[np.isfinite(leads)]
    if len(finite) < MIN_MEASURED_RESAMPLES * n_resamples:
        return point, float("nan"), float("nan"), len(differ)
    low, high = np.percentile(finite, [2.5, 97.5])
    return point, float(low), float(high), len(differ)


def qini_curve(y: np.ndarray, treated: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Incremental outcome of targeting the top k by score, k = 0..n (Radcliffe's Qini)."""
    order = np.argsort(-score, kind="stable")
    y, t = y[order], treated[order].astype(bool)
    n_t, n_c = np.cumsum(t), np.cumsum(~t)
    y_t, y_c = np.cumsum(np.where(t, y, 0.0)), np.cumsum(np.where(t, 0.0, y))
    with np.errstate(divide="ignore", invalid="ignore"):
        q = y_t - np.where(n_c > 0, y_c * n_t / n_c, 0.0)
    return np.concatenate([[0.0], q])


def qini_coefficient(y: np.ndarray, treated: np.ndarray, score: np.ndarray) -> float:
    """Mean gap between the Qini curve and the random-targeting line, per customer."""
    q = qini_curve(y, treated, score)
    line = np.linspace(0.0, q[-1], len(q))
    return float((q - line).mean() / max(len(y), 1))


def auuc(y: np.ndarray, treated: np.ndarray, score: np.ndarray) -> float:
    """Area under the uplift (Qini) curve, per customer."""
    q = qini_curve(y, treated, score)
    return float(q.mean() / max(len(y), 1))


def _arms_with_controls(
    actions: list[str],
    effects: dict[str, np.ndarray],
    arms: np.ndarray,
    y: np.ndarray,
    at_least: int = 10,
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Per action with ``at_least`` treated and as many controls: its customers' and the
    controls' outcomes, whether each was treated, and the model's effect score for each."""
    for action in actions:
        if (arms == action).sum() < at_least or (arms == CONTROL).sum() < at_least:
            continue
        chosen = (arms == action) | (arms == CONTROL)
        yield action, y[chosen], arms[chosen] == action, effects[action][chosen]


def evaluate(model: TLearner, holdout: pd.DataFrame) -> dict[str, float]:
    effects = model.effects(holdout)
    scores = {a: effects[a].to_numpy() for a in model.actions}
    y = holdout["revenue"].to_numpy(dtype="float64")
    metrics: dict[str, float] = {}
    for action, y_a, t, s in _arms_with_controls(model.actions, scores, arm(holdout), y):
        metrics[f"qini_{action}"] = qini_coefficient(y_a, t, s)
        metrics[f"auuc_{action}"] = auuc(y_a, t, s)
    qinis = [v for k, v in metrics.items() if k.startswith("qini_")]
    metrics["qini_mean"] = float(np.mean(qinis)) if qinis else float("nan")
    return metrics


def _plot(model: TLearner, holdout: pd.DataFrame, path: Path) -> None:
    arms = arm(holdout)
    effects = model.effects(holdout)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for action in model.actions:
        chosen = (arms == action) | (arms == CONTROL)
        if (arms == action).sum() < 10:
            continue
        q = qini_curve(
            holdout["revenue"].to_numpy()[chosen],
            arms[chosen] == action,
            effects[action].to_numpy()[chosen],
        )
        x = np.linspace(0, 1, len(q))
        ax.plot(x, q, label=action)
        ax.plot([0, 1], [0, q[-1]], linestyle=":", color=ax.lines[-1].get_color())
    ax.set_xlabel("share of customers targeted, by predicted uplift")
    ax.set_ylabel("incremental revenue (Qini)")
    ax.set_title("Qini curves on the held-out randomised outcomes (dotted: random)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


class UpliftPyfunc(mlflow.pyfunc.PythonModel):
    """Input: the uplift features; output: each action's expected revenue effect."""

    def load_context(self, context) -> None:
        import joblib

        self.model = joblib.load(Path(context.artifacts["model_dir"]) / "tlearner.joblib")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        return predict_frame(self.model, model_input)


def predict_frame(model: TLearner, frame: pd.DataFrame) -> pd.DataFrame:
    """Each action's revenue effect, its standard error (``<action>_std_error``), the part
    of that error shared with the other actions through the controls
    (``<action>_shared_std_error``) and its unsubscribes per customer sent it
    (``<action>_unsubscribe_rate``) where the learner gives them: what the registered model
    returns."""
    frame = frame.reset_index(drop=True)
    effects = model.effects(frame).reset_index(drop=True)
    if hasattr(model, "std_errors"):
        errors = model.std_errors(frame).reset_index(drop=True)
        effects = pd.concat([effects, errors.add_suffix("_std_error")], axis=1)
    if hasattr(model, "shared_std_errors"):
        shared = model.shared_std_errors(frame).reset_index(drop=True)
        effects = pd.concat([effects, shared.add_suffix("_shared_std_error")], axis=1)
    if hasattr(model, "unsubscribe_rates"):
        rates = model.unsubscribe_rates(frame).reset_index(drop=True)
        effects = pd.concat([effects, rates.add_suffix("_unsubscribe_rate")], axis=1)
    return effects


@dataclass(frozen=True)
class UpliftReport:
    trained: bool
    reason: str
    outcomes: int
    promoted: bool = False
    version: str | None = None
    champion: str | None = None
    metrics: dict | None = None

    def summary(self) -> str:
        if not self.trained:
            return f"uplift model not trained: {self.reason}"
        return (
            f"uplift model v{self.version} on {self.outcomes:,} randomised outcomes: mean Qini "
            f"{self.metrics['qini_mean']:.3f}; "
            + (
                "promoted to champion"
                if self.promoted
                else f"champion v{self.champion} stays"
                if self.champion
                else "not promoted, no champion yet"
            )
            + f" ({self.reason})"
        )


def champion_version(tracking_uri: str) -> str | None:
    return registry.champion_version(MlflowClient(tracking_uri), UPLIFT_MODEL)


def load_champion(tracking_uri: str) -> tuple[TLearner, str] | None:
    version = champion_version(tracking_uri)
    if version is None:
        return None
    mlflow.set_tracking_uri(tracking_uri)
    loaded = mlflow.pyfunc.load_model(f"models:/{UPLIFT_MODEL}@{registry.CHAMPION}")
    return loaded.unwrap_python_model().model, version


GATES = ("guardrail", "superiority")


def train(
    warehouse: Path,
    tracking_uri: str,
    artifacts_dir: Path,
    min_outcomes: int,
    reason: str = "manual",
    seed: int = 42,
    discounts: dict[str, float] | None = None,
    n_bootstrap: int = GATE_BOOTSTRAP,
    target: PolicyTarget | None = None,
    gate: str = "guardrail",
) -> UpliftReport:
    """Fit on four fifths of the customers, evaluate on the fixed holdout (Qini, AUUC, plots),
    gate the policy against the incumbent's on ``target`` (:func:`policy_lead`, see the module
    for the ``gate`` rules), refit on every outcome, log to MLflow and register; the alias
    moves only when the gate promotes."""
    if gate not in GATES:
        raise ValueError(f"unknown uplift gate {gate!r}: one of {', '.join(GATES)}")
    frame = load_outcomes(warehouse)
    if len(frame) < min_outcomes:
        return UpliftReport(
            False,
            f"{len(frame):,} matured randomised outcomes, fewer than the "
            f"{min_outcomes:,} needed (VALUELOOP_UPLIFT_MIN_OUTCOMES); the playbook stays",
            len(frame),
        )
    held = holdout_mask(frame)
    train_part, holdout = frame[~held].reset_index(drop=True), frame[held].reset_index(drop=True)
    model = CellLearner(seed, discounts).fit(train_part)
    metrics = evaluate(model, holdout)
    champion = load_champion(tracking_uri)
    champion_metrics = evaluate(champion[0], holdout) if champion else None
    lead = (
        policy_lead(model, champion[0] if champion else None, holdout, target, n_bootstrap, seed)
        if target is not None
        else None
    )
    promote, why = gate_decision(
        lead, champion, gate, None if target is None else len(target.frame)
    )
    # what the gate could weigh the champion on (policy_lead): the campaigns it learned from
    # are left out, where it records them
    learned_from = getattr(champion[0], "campaigns", None) if champion else None
    weighed_on = sorted(set(holdout["campaign_id"].astype(str)) - set(learned_from or ()))
    # What is registered, and deployed if promoted: the same learner on every outcome. The
    # checks above are of it on four fifths; a fifth fewer outcomes cost the benchmark's
    # policy about half its lead over the playbook (BENCHMARKS.md, "The uplift gate").
    deployed = CellLearner(seed, discounts).fit(frame)
    registry.configure(tracking_uri, artifacts_dir, UPLIFT_EXPERIMENT)
    with mlflow.start_run(run_name="uplift") as run, tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tags({"valueloop.kind": "uplift", "valueloop.retrain_reason": reason})
        arms = pd.Series(arm(train_part)).value_counts()
        mlflow.log_params(
            {
                "learner": "cells: incremental orders per cell against its controls, x value",
                "cells": json.dumps({c: len(e) + 1 for c, e in model.edges.items()}),
                "features": ",".join(FEATURES),
                "outcomes": len(frame),
                "campaigns": frame["campaign_id"].nunique(),
                "holdout_share": HOLDOUT_SHARE,
                "gate": gate,
                "registered_fit": f"every outcome ({len(frame):,}); metrics: four fifths",
                **{f"train_{k}": int(v) for k, v in arms.items()},
            }
        )
        mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
        # unsubscribes per treated customer, each action over all cells
        rates = getattr(model, "unsubscribe_overall", None) or {}
        mlflow.log_metrics({f"unsubscribe_rate_{a}": r for a, r in rates.items()})
        if champion_metrics:
            mlflow.log_metrics(
                {f"champion_{k}": v for k, v in champion_metrics.items() if np.isfinite(v)}
            )
        if lead is not None:
            named = zip(("", "_low", "_high"), lead[:3], strict=True)
            mlflow.log_metrics({f"gate_policy_lead{k}": v for k, v in named if np.isfinite(v)})
            mlflow.log_metric("gate_switched_customers", lead[3])
        plot = Path(tmp) / "qini_curves.png"
        _plot(model, holdout, plot)
        mlflow.log_artifact(str(plot), artifact_path="plots")
        import joblib

        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        joblib.dump(deployed, model_dir / "tlearner.joblib")
        example = holdout[list(FEATURES)].head(5).astype("float64")
        signature = infer_signature(example, predict_frame(deployed, example))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=UpliftPyfunc(),
            artifacts={"model_dir": str(model_dir)},
            signature=signature,
            input_example=example,
            code_paths=[str(Path(__file__).parent)],
            pip_requirements=registry.pip_requirements(),
            registered_model_name=UPLIFT_MODEL,
        )
        version = str(info.registered_model_version)
        mlflow.log_dict(
            {
                "promote": promote,
                "reason": why,
                "gate": gate,
                "policy_lead": None
                if lead is None
                else dict(zip(("lead", "low", "high", "switched"), lead, strict=True)),
                # the held-out outcomes' campaigns the lead was measured on, and those the
                # champion learned from (None: it predates the record, weighed on them all)
                "weighed_on_campaigns": weighed_on,
                "champion_learned_from": None if learned_from is None else sorted(learned_from),
                "metrics": metrics,
                "champion": champion_metrics,
            },
            "gate_decision.json",
        )
        mlflow.set_tag("valueloop.gate", why)
        if promote:
            MlflowClient(tracking_uri).set_registered_model_alias(
                UPLIFT_MODEL, registry.CHAMPION, version
            )
        log.info("uplift gate: %s (run %s)", why, run.info.run_id)
    return UpliftReport(
        True,
        why,
        len(frame),
        promote,
        version,
        version if promote else (champion[1] if champion else None),
        metrics,
    )


def gate_decision(
    lead: tuple[float, float, float, int] | None,
    champion: tuple[TLearner, str] | None,
    gate: str,
    customers: int | None,
) -> tuple[bool, str]:
    """Promote, and why, from the challenger's policy lead (see :func:`policy_lead`). Without
    an interval (no resamples, or too few with a control) the point estimate decides."""
    if gate not in GATES:
        raise ValueError(f"unknown uplift gate {gate!r}: one of {', '.join(GATES)}")
    incumbent = f"champion v{champion[1]}" if champion else "the playbook"
    if lead is None:
        return False, (
            f"no published scores to weigh its policy against the incumbent's on: {incumbent} stays"
        )
    diff, low, high, switched = lead
    # policy_lead weighs a champion that records its campaigns on the others' outcomes only
    fresh = bool(champion and getattr(champion[0], "campaigns", None))
    if switched and not np.isfinite(diff):
        held = (
            f"no held-out outcome of a campaign {incumbent} did not learn from has a control"
            if fresh
            else "the held-out outcomes have no control"
        )
        return False, (
            f"its policy changes the action of {switched:,} customers, and {held} "
            f"to measure that against: {incumbent} stays"
        )
    if not switched:
        return gate == "guardrail", (
            f"its policy picks the same action as {incumbent} for all {customers:,} customers"
            + (": nothing to lose" if gate == "guardrail" else f": {incumbent} stays")
        )
    bounded = np.isfinite(low)
    measured = (
        f"its policy earns {diff:+.3f} a customer over {incumbent} on held-out randomised "
        f"outcomes{f' of campaigns {incumbent} did not learn from' if fresh else ''} "
        f"({switched:,} of {customers:,} customers get another action; "
        + (f"95% interval [{low:+.3f}, {high:+.3f}])" if bounded else "no interval)")
    )
    if gate == "superiority":
        if (low if bounded else diff) > 0:
            return True, f"{measured}: a gain beyond the noise"
        return False, f"{measured}: no gain beyond the noise, {incumbent} stays"
    if (high if bounded else diff) < 0:
        return False, f"{measured}: a loss beyond the noise, {incumbent} stays"
    return True, f"{measured}: no loss beyond the noise"


def to_json(report: UpliftReport) -> str:
    return json.dumps(asdict(report), default=str)
