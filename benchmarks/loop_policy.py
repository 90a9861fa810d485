"""The loop's policies scored against the demo market's hidden truth, over cycles and seeds.

For each seed: the demo shop is generated, ingested and built with dbt (the real marts), a
LightGBM baseline scores every customer (tier, churn), and the seed playbook turns the scores
into actions. Then, cycle after cycle, campaigns go out as the platform plans them (the
policy's actions, 20% exploration, 10% stratified control, `valueloop.campaigns`), outcomes
are drawn from the market's true effects (``valueloop.market.TRUE_EFFECTS``: Poisson orders
with the effect's extra order or comeback, Gamma order values with the true means, the
discount taken off), and the uplift model (``ml.uplift``, ``--learner``) is refitted on
everything randomised so far and gated as the platform gates it (``--gate``, default the
setting ``VALUELOOP_UPLIFT_GATE``: the same learner fitted on four fifths of the customers,
its policy weighed against the incumbent's on the held-out fifth, the refit deployed when
it passes). After each cycle every policy is scored by the **true expected
incremental profit** of the actions it picks for all eligible customers
(``market.expected_incremental_profit``, each expected unsubscribe charged at the setting
``VALUELOOP_UNSUBSCRIBE_COST``): the learned policy (the uplift champion's, as deployed;
``ungated``: the latest refit's), the static playbook, random targeting (a random eligible
action for as many customers as the playbook targets), no action, the oracle that knows
the true effects, and the *feature ceiling*: a model of the uplift features fitted on the
true profits, the most any learner of those features could
earn (:func:`feature_ceiling`). ``--noise-bound`` adds what the learner's cells could earn
with unbiased estimates as noisy as its own, and with 2, 4 and 8 times the outcomes
(:func:`noise_bound`).

    python benchmarks/loop_policy.py --seeds 1 2 3 --cycles 3 --customers 10000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
from lightgbm import LGBMRegressor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml import uplift
from ml.baselines import LightGBMBaseline
from ml.data import numeric_columns, read_mart
from valueloop import campaigns, jobs, market, transform
from valueloop.config import load_settings

BAND_MEDIUM, BAND_HIGH = 0.4, 0.7  # the dbt vars churn_band_medium / churn_band_high
VALUE_CV = 0.8  # spread of one order's value around the type's mean
LEARNER = "cells"
CONFIDENCE_Z = None  # None: the setting VALUELOOP_UPLIFT_CONFIDENCE_Z
VERBOSE = False
BLIND_TO_UNSUBSCRIBES = False  # the policy ignores unsubscribes (the truth still counts them)
GATE = "guardrail"  # the uplift gate the platform applies (ml.uplift.GATES), or "none"
NOISE_BOUND = False  # --noise-bound: what the cells could earn on noise as large as theirs
NOISE_SCALES = (1, 2, 4, 8)  # the evidence, as multiples of what the loop gathered
NOISE_DRAWS = 30


def playbook(settings, scores: pd.DataFrame) -> np.ndarray:
    rules = pd.read_csv(settings.dbt_project_dir / "seeds" / "next_best_actions.csv")
    level = np.where(scores["p_high"] >= 1.5 * scores["p_high"].mean(), "high", "mid")
    out = []
    for tier, band, lvl in zip(scores["value_tier"], scores["churn_risk_band"], level, strict=True):
        rows = rules[(rules.value_tier == tier) & (rules.churn_risk_band == band)]
        exact = rows[rows.segment_value_level == lvl]
        pick = exact if len(exact) else rows[rows.segment_value_level == "any"]
        out.append(pick.next_best_action.iloc[0] if len(pick) else "no_action")
    return np.array(out, object)


def draw_revenue(rng, truth_inputs: dict, actions: np.ndarray, treated: np.ndarray):
    """One window's orders, revenue and unsubscribes per customer under the market's true
    effects (an unsubscribe needs a delivered message, as the activation tool reports it)."""
    base, value, active, types = (truth_inputs[k] for k in ("base", "value", "active", "types"))
    eff = [
        market.effect(a, t) if is_t else market.NO_EFFECT
        for a, t, is_t in zip(actions, types, treated, strict=True)
    ]
    lift = np.array([e.lift for e in eff])
    revive = np.array([e.revive for e in eff])
    discount = np.array([e.discount for e in eff])
    unsubscribe = market.P_DELIVERED * np.array([e.unsubscribe for e in eff])
    orders = np.where(
        active, rng.poisson(base) + (rng.random(len(base)) < lift), rng.random(len(base)) < revive
    )
    shape = 1 / VALUE_CV**2
    per_order = rng.gamma(shape, value / shape)
    return orders, orders * per_order * (1 - discount), rng.random(len(base)) < unsubscribe


def truth_inputs(shop: Path, ids: pd.Series, start: datetime, days: int) -> dict:
    window = market.expectation(shop, ids, start, days)
    return {
        "base": window.base_orders,
        "value": window.order_value,
        "active": window.active,
        "types": pd.Series(window.customer_type),
    }


def policy_value(profit: pd.DataFrame, actions: np.ndarray) -> float:
    """The true profit of giving each customer (row) their action; 0 for one not in
    ``profit`` (no action)."""
    if len(actions) != len(profit):
        raise ValueError(f"{len(actions)} actions for {len(profit)} customers")
    column = profit.columns.get_indexer(pd.Index(np.asarray(actions, dtype=object)))
    values = profit.to_numpy()[np.arange(len(profit)), np.maximum(column, 0)]
    return float(np.where(column >= 0, values, 0.0).sum())


def noise_bound(
    learner: uplift.CellLearner,
    target: uplift.PolicyTarget,
    profit: pd.DataFrame,
    seed: int,
    scales: tuple[int, ...] = NOISE_SCALES,
    draws: int = NOISE_DRAWS,
) -> dict[str, float]:
    """What the learner's cells could earn on evidence as noisy as its own, and on ``scales``
    times as much (``--noise-bound``). Each cell's *true* mean profit per action, from the
    market's truth, plus noise drawn as large as the learner's standard errors there (the
    controls' part common to the cell's actions, as in :func:`uplift.choose`), divided by
    sqrt(scale): the learner's noise without its bias. Three rules decide on them, each
    averaged over ``draws`` draws:

    * ``rule``: the platform's (:func:`uplift.choose`: the playbook as the baseline, switches
      only on a gain beyond z errors);
    * ``bayes``: the best action by the posterior mean under an *oracle* prior (per action,
      normal with the mean and spread of the true cell profits, weighted by customers);
    * ``bayes_rule``: the platform's rule on that posterior (mean and standard deviation).

    Returns total true profits: ``cells_exact`` (each cell's true mean known) and
    ``{rule}_x{scale}``."""
    frame = target.frame.reset_index(drop=True)
    columns = [a for a in profit.columns if a in learner.actions]
    truth = profit[columns].to_numpy()
    margin = target.margin
    cost = np.array([target.costs[a] for a in columns])
    scale = np.array([uplift.profit_error_scale(learner, margin)[a] for a in columns])
    error = np.abs(scale) * learner.std_errors(frame)[columns].to_numpy()
    shared = scale * learner.shared_std_errors(frame)[columns].to_numpy()
    allowed = np.array([[a in e for a in columns] for e in target.eligible], dtype=bool)
    names = np.asarray(columns, dtype=object)
    _, cell = np.unique(learner._cells(frame), return_inverse=True)
    # per cell and action, over the customers the action is open to
    size = np.column_stack([np.bincount(cell, a) for a in allowed.T.astype("float64")])

    def per_cell(values: np.ndarray) -> np.ndarray:
        sums = np.column_stack([np.bincount(cell, v) for v in (values * allowed).T])
        return sums / np.maximum(size, 1)

    theta, se, se_shared = per_cell(truth), per_cell(error), per_cell(shared)
    prior_mean = (theta * size).sum(0) / np.maximum(size.sum(0), 1)
    prior_var = ((theta - prior_mean) ** 2 * size).sum(0) / np.maximum(size.sum(0), 1)

    def best(estimate: np.ndarray) -> np.ndarray:
        value = np.where(allowed, estimate[cell], -np.inf)
        return np.where(value.max(axis=1) > 0, names[value.argmax(axis=1)], "no_action")

    def rule(estimate: np.ndarray, sd: np.ndarray, sd_shared: np.ndarray) -> np.ndarray:
        return uplift.choose(
            pd.DataFrame((estimate[cell] + cost) / margin, columns=columns),
            target.costs,
            margin,
            target.eligible,
            target.playbook,
            pd.DataFrame(sd[cell] / margin, columns=columns),
            target.confidence_z,
            pd.DataFrame(sd_shared[cell] / margin, columns=columns),
            target.bounded,
        )[0]

    out = {"cells_exact": policy_value(profit, best(theta))}
    rng = np.random.default_rng(seed)
    own = np.sqrt(np.clip(se**2 - se_shared**2, 0, None))
    for scale in scales:
        totals: dict[str, list[float]] = {"rule": [], "bayes": [], "bayes_rule": []}
        variance = se**2 / scale
        shrink = prior_var / np.maximum(prior_var + variance, 1e-12)
        posterior_sd = np.sqrt(shrink * variance)
        for _ in range(draws):
            noise = se_shared * rng.standard_normal((len(size), 1))  # a cell's controls
            noise = (noise + own * rng.standard_normal(se.shape)) / np.sqrt(scale)
            estimate = theta + noise
            posterior = prior_mean + shrink * (estimate - prior_mean)
            totals["rule"].append(
                policy_value(profit, rule(estimate, np.sqrt(variance), se_shared / np.sqrt(scale)))
            )
            totals["bayes"].append(policy_value(profit, best(posterior)))
            totals["bayes_rule"].append(
                policy_value(
                    profit, rule(posterior, posterior_sd, se_shared * np.sqrt(shrink / scale))
                )
            )
        out |= {f"{name}_x{scale}": float(np.mean(v)) for name, v in totals.items()}
    return out


def feature_ceiling(profit: pd.DataFrame, scores: pd.DataFrame, allowed: np.ndarray) -> np.ndarray:
    """What the best model of the uplift features could do with perfect knowledge: per action
    a LightGBM fitted on the *true* incremental profit (two-fold cross-fitted), then the best
    eligible action. The gap to the oracle is what the features cannot tell (the latent type);
    the gap from the learned policy to this is what noisy outcomes cost."""
    x = scores[list(uplift.FEATURES)].astype("float64").reset_index(drop=True)
    fold = np.arange(len(x)) % 2
    pred = np.zeros(profit.shape)
    for j, action in enumerate(profit.columns):
        y = profit[action].to_numpy()
        for k in (0, 1):
            model = LGBMRegressor(n_estimators=300, num_leaves=15, verbose=-1, n_jobs=1)
            model.fit(x[fold != k], y[fold != k])
            pred[fold == k, j] = model.predict(x[fold == k])
    masked = np.where(allowed, pred, -np.inf)
    return np.where(
        masked.max(axis=1) > 0, profit.columns.to_numpy()[masked.argmax(axis=1)], "none"
    )


def run_seed(seed: int, customers: int, cycles: int, work: Path) -> list[dict]:
    import os

    os.environ["VALUELOOP_HOME"] = str(work / f"seed{seed}")
    settings = load_settings()
    settings.ensure_dirs()
    jobs.generate_demo(settings, customers, seed)
    jobs.ingest_path(settings, settings.demo_dir, "simulator")
    transform.build(settings, quiet=True)
    train = read_mart(settings.warehouse_path, "training_set")
    numeric = numeric_columns(train)
    model = LightGBMBaseline(numeric, seed).fit(
        train[train.split == "train"], train[train.split == "validation"]
    )
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        scoring = con.execute("select * from marts.scoring_set order by customer_id").df()
    # LightGBM's own outputs (its churn model's probability, the tier model's argmax), as this
    # benchmark has scored since it began: its figures stay comparable across the sessions.
    pred = model.raw(scoring)
    tiers = np.array(["high", "active", "lapsed"])[pred.tier_probs.argmax(axis=1)]
    scores = scoring.assign(
        p_high=pred.tier_probs[:, 0],
        churn_probability=pred.churn_prob,
        value_tier=tiers,
        churn_risk_band=np.select(
            [pred.churn_prob >= BAND_HIGH, pred.churn_prob >= BAND_MEDIUM],
            ["high", "medium"],
            "low",
        ),
    )
    actions = campaigns.load_actions(settings)
    costs = {a: x.cost for a, x in actions.items()}
    eligible = [
        campaigns.eligible_actions(actions, t, b)
        for t, b in zip(scores["value_tier"], scores["churn_risk_band"], strict=True)
    ]
    as_of = pd.Timestamp(scoring["as_of"].max()).to_pydatetime()
    start, days = as_of + timedelta(days=1), settings.campaign_window_days
    profit = market.expected_incremental_profit(
        settings.demo_dir,
        scores["customer_id"],
        list(actions),
        start,
        days,
        settings.margin_rate,
        costs,
        settings.unsubscribe_cost,
    )
    allowed = np.array([[a in e for a in profit.columns] for e in eligible])
    masked = profit.where(allowed, -np.inf)
    best = masked.to_numpy().max(axis=1)
    oracle = np.where(best > 0, masked.columns.to_numpy()[masked.to_numpy().argmax(axis=1)], "none")
    book = playbook(settings, scores)
    book = np.array([a if a in e else "no_action" for a, e in zip(book, eligible, strict=True)])
    rng = np.random.default_rng(seed)
    targeted = int((book != "no_action").sum())
    random_actions = np.full(len(scores), "no_action", object)
    pool = np.flatnonzero([bool(e) for e in eligible])
    for i in rng.choice(pool, min(targeted, len(pool)), replace=False):
        random_actions[i] = eligible[i][rng.integers(len(eligible[i]))]
    inputs = truth_inputs(settings.demo_dir, scores["customer_id"], start, days)
    reference = {
        "oracle": policy_value(profit, oracle),
        "ceiling": policy_value(profit, feature_ceiling(profit, scores, allowed)),
        "playbook": policy_value(profit, book),
        "random": policy_value(profit, random_actions),
        "no_action": 0.0,
    }
    salt = "benchmark"
    scores["customer_key"] = [campaigns.customer_key(salt, c) for c in scores["customer_id"]]
    target = uplift.PolicyTarget(
        frame=scores,
        playbook=book,
        eligible=eligible,
        costs=costs,
        bounded=frozenset(a for a, x in actions.items() if x.discount == 0),
        margin=settings.margin_rate,
        confidence_z=settings.uplift_confidence_z if CONFIDENCE_Z is None else CONFIDENCE_Z,
        unsubscribe_cost=0.0 if BLIND_TO_UNSUBSCRIBES else settings.unsubscribe_cost,
    )

    def fit(data: pd.DataFrame):
        learner = uplift.LEARNERS[LEARNER](seed)
        learner.discounts = {a: x.discount for a, x in actions.items()}
        return learner.fit(data)

    history: list[pd.DataFrame] = []
    current, champion, results = book.copy(), None, []
    for cycle in range(1, cycles + 1):
        campaign_id = f"bench-{seed}-{cycle}"
        frame = scores.assign(
            next_best_action=current,
            policy="playbook" if champion is None else "uplift",
            expected_incremental_profit=np.nan,
            segment_name="all",
        )
        # as the platform does, customers who unsubscribed are never contacted again
        gone = {k for h in history for k in h.loc[h["unsubscribed"], "customer_key"]}
        chosen = campaigns._choose(frame, actions, campaign_id, settings, gone)
        chosen["group_name"] = np.where(
            campaigns.control_flags(chosen, campaign_id, settings.campaign_control_share),
            "control",
            "treatment",
        )
        index = scores.reset_index().set_index("customer_key").loc[chosen["customer_key"], "index"]
        sub = {
            k: (v[index.to_numpy()] if k != "types" else v.iloc[index.to_numpy()].to_numpy())
            for k, v in inputs.items()
        }
        treated = (chosen["group_name"] == "treatment").to_numpy()
        chosen["orders"], chosen["revenue"], chosen["unsubscribed"] = draw_revenue(
            rng, sub, chosen["action"].to_numpy(), treated
        )
        chosen["campaign_id"] = campaign_id
        history.append(chosen)
        data = pd.concat(history, ignore_index=True)
        learner = fit(data)
        ungated = target.actions(learner)
        lead, true_lead = (np.nan, np.nan, np.nan, 0), None
        if GATE == "none":  # each refit used directly
            champion, current, promoted = learner, ungated, True
        else:  # as the platform does (ml.uplift.train): check on four fifths, deploy the refit
            held = uplift.holdout_mask(data)
            challenger = fit(data[~held].reset_index(drop=True))
            lead = uplift.policy_lead(
                challenger,
                champion,
                data[held].reset_index(drop=True),
                target,
                settings.uplift_gate_bootstrap,
                seed,
            )
            incumbent = (champion, "in use") if champion is not None else None
            promoted, _ = uplift.gate_decision(lead, incumbent, GATE, len(scores))
            true_lead = (
                policy_value(profit, target.actions(challenger)) - policy_value(profit, current)
            ) / len(scores)
            if promoted:
                champion, current = learner, ungated
        learned = current
        value = policy_value(profit, learned)
        results.append(
            {
                "seed": seed,
                "cycle": cycle,
                "outcomes": len(data),
                "learned": value,
                "promoted": bool(promoted),
                # the gate's held-out lead per customer, its 95% interval, customers switched
                "gate": [round(float(v), 4) for v in lead],
                # what the challenger's policy truly earns over the incumbent's, per customer
                "true_lead": true_lead,
                "ungated": policy_value(profit, ungated),
                **reference,
                "vs_playbook": value / reference["playbook"] if reference["playbook"] else None,
                "share_of_oracle": value / reference["oracle"] if reference["oracle"] else None,
            }
        )
        if NOISE_BOUND and reference["playbook"]:  # the latest refit's cells, x the playbook
            bound = noise_bound(learner, target, profit, seed)
            results[-1] |= {f"bound_{k}": v / reference["playbook"] for k, v in bound.items()}
        print(json.dumps(results[-1]), flush=True)
        if VERBOSE:
            mix = pd.crosstab(pd.Series(oracle, name="oracle"), pd.Series(learned, name="learned"))
            print(mix.to_string(), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--learner", choices=sorted(uplift.LEARNERS), default="cells")
    parser.add_argument("--verbose", action="store_true", help="print oracle vs learned actions")
    parser.add_argument("--confidence-z", type=float, help="default: the platform's setting")
    parser.add_argument(
        "--gate",
        choices=[*uplift.GATES, "none"],
        help="the uplift gate (default: the setting VALUELOOP_UPLIFT_GATE); none: every "
        "refit used directly, as this benchmark did until 2026-11-27",
    )
    parser.add_argument(
        "--blind-to-unsubscribes",
        action="store_true",
        help="the learned policy does not charge unsubscribes (the truth still does)",
    )
    parser.add_argument(
        "--noise-bound",
        action="store_true",
        help="also score what the cells could earn with unbiased estimates as noisy as the "
        "learner's, and with 2, 4 and 8 times the outcomes (noise_bound), as x the playbook",
    )
    args = parser.parse_args()
    if args.learner != "cells" and args.noise_bound:
        parser.error("--noise-bound reads the cells' errors: it needs --learner cells")
    if args.learner != "cells" and args.gate != "none":
        parser.error(
            "the uplift gate measures the cells' effects again: "
            "with a --learner other than cells, pass --gate none"
        )
    global LEARNER, VERBOSE, CONFIDENCE_Z, BLIND_TO_UNSUBSCRIBES, GATE, NOISE_BOUND
    LEARNER, VERBOSE, CONFIDENCE_Z = args.learner, args.verbose, args.confidence_z
    NOISE_BOUND = args.noise_bound
    GATE = args.gate or load_settings().uplift_gate
    BLIND_TO_UNSUBSCRIBES = args.blind_to_unsubscribes
    rows = []
    with tempfile.TemporaryDirectory(prefix="valueloop-loop-bench-") as tmp:
        for seed in args.seeds:
            rows += run_seed(seed, args.customers, args.cycles, Path(tmp))
    table = pd.DataFrame(rows)
    mean = table.groupby("cycle")[
        [
            "learned",
            "ungated",
            "promoted",
            "playbook",
            "random",
            "ceiling",
            "oracle",
            "vs_playbook",
            "share_of_oracle",
        ]
    ].mean()
    print("\nmean over seeds, expected incremental profit of each policy (true effects):")
    print(mean.round(3).to_string())
    if NOISE_BOUND:
        bound = table.groupby("cycle")[[c for c in table if c.startswith("bound_")]].mean()
        bound.columns = [c.removeprefix("bound_") for c in bound.columns]
        print("\nmean over seeds, x the playbook: the learned policy and what the cells could earn")
        print("with unbiased estimates (exact; noise as the learner's, / sqrt of x outcomes):")
        print(pd.concat([mean[["vs_playbook"]], bound], axis=1).round(3).T.to_string())


if __name__ == "__main__":
    main()
