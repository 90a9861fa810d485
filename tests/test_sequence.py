"""The behaviour-sequence transformer: its input never sees past its cutoff (through the real
marts), its pretraining objective learns, it trains, registers and scores through Lightning
and MLflow, and what it computes once (text embeddings, the pretrained encoder) is reused."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import duckdb
import mlflow
import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import yaml

from ml import reasons, registry, sequence
from ml.config import DEFAULT_CONFIG, TrainConfig
from ml.data import (
    SEQUENCE_COLUMN,
    TIERS,
    md5_sample,
    read_mart,
    read_training_data,
    tier_index,
    to_model_input,
)
from ml.ensemble import MeanEnsemble
from ml.evaluate import coherent_tiers, decide_tiers, fit_tier_weights
from ml.model import TINY_RANDOM
from tests.conftest import REPO_ROOT
from valueloop.config import Settings, load_settings

TINY = Path(DEFAULT_CONFIG).with_name("tiny.yaml")
MAX_EVENTS = yaml.safe_load((REPO_ROOT / "dbt_project" / "dbt_project.yml").read_text())["vars"][
    "max_events"
]


def test_no_event_after_a_cutoff_reaches_its_sequence(pipeline_run: Settings) -> None:
    """Every training and scoring row holds exactly its customer's latest events on or before
    its cutoff (checked against marts.customer_events), none after."""
    with duckdb.connect(str(pipeline_run.warehouse_path), read_only=True) as con:
        rows = con.execute(
            f"select customer_id, as_of, {SEQUENCE_COLUMN} from marts.training_set union all "
            f"select customer_id, as_of, {SEQUENCE_COLUMN} from marts.scoring_set"
        ).df()
        events = con.execute("select customer_id, event_on from marts.customer_events").df()
    assert len(rows) > 1000
    by_customer = {
        c: pd.to_datetime(g["event_on"]).to_numpy() for c, g in events.groupby("customer_id")
    }
    cutoffs_seen = set()
    for row in rows.itertuples(index=False):
        days = json.loads(row.event_sequence)["days_before"]
        as_of = np.datetime64(pd.Timestamp(row.as_of))
        on = by_customer[row.customer_id]
        known = np.sort(((as_of - on[on <= as_of]) / np.timedelta64(1, "D")).astype(int))
        assert min(days) >= 0, row
        assert len(days) == min(MAX_EVENTS, len(known)), row
        assert sorted(days) == known[: len(days)].tolist(), row
        cutoffs_seen.add(row.as_of)
    assert len(cutoffs_seen) > 2  # every cutoff of the training set, and the scoring day


def _toy_events(n: int = 256, length: int = 12) -> sequence.EventArrays:
    """Customers whose events share a category and an amount level of their own."""
    rng = np.random.default_rng(0)
    numbers = np.zeros((n, length, len(sequence.EVENT_NUMBERS)), dtype="float32")
    categories = np.zeros((n, length), dtype="int64")
    for i in range(n):
        categories[i] = 2 + i % 8
        numbers[i, :, 2] = rng.normal(i % 5, 0.1, length)
        numbers[i, :, 0] = np.log1p(np.arange(length) * (1 + i % 3))
    return sequence.EventArrays(
        numbers,
        np.ones((n, length), dtype="int64"),
        categories,
        np.zeros((n, length, sequence.TEXTS_PER_EVENT), dtype="int64"),
        np.full(n, length),
    )


def test_coles_pretraining_objective_decreases_on_a_toy_set() -> None:
    spec = sequence.SequenceSpec(hidden=16, layers=1, heads=2, max_events=12, n_categories=8)
    cfg = SimpleNamespace(
        pretrain_lr=3e-3,
        pretrain_temperature=0.1,
        pretrain_batch_size=64,
        pretrain_epochs=6,
        seed=0,
    )
    trainer = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False}
    # Seeded as fit_sequence_model seeds it: the encoder's initial weights come from torch's
    # global generator, which otherwise carries whatever the tests before this one drew (one
    # CI run's draw ended at 0.64 of the first loss; seeds 0-5 end at 0.47-0.58).
    pl.seed_everything(cfg.seed, verbose=False)
    state, losses = sequence.pretrain(
        _toy_events(), spec, np.zeros((0, spec.text_dim), "float32"), cfg, trainer
    )
    assert len(losses) == 6
    # Chance is log(64) = 4.16 for a batch of 64; the slices of one customer find each other.
    assert losses[-1] < 0.6 * losses[0], losses
    assert any(name.startswith("bert.encoder.layer.0") for name in state)


def test_random_slices_are_contiguous_and_keep_the_newest_first() -> None:
    events = _toy_events(8, 10)
    events.numbers[:, :, 3] = np.arange(10)  # a position marker
    sliced = sequence.random_slices(events, np.random.default_rng(1))
    for row in range(8):
        size = int(sliced.lengths[row])
        assert 4 <= size <= 10
        marker = sliced.numbers[row, :size, 3]
        assert np.all(np.diff(marker) == 1)  # contiguous, in the original order
        assert not sliced.kinds[row, size:].any()  # padded after the slice
        assert sliced.numbers[row, size - 1, 1] == 0  # the slice's oldest has no gap


def test_texts_are_embedded_once_and_reused(tmp_path: Path) -> None:
    texts = pd.DataFrame({"text_key": ["a1", "b2"], "text": ["red mug", "blue lamp"]})
    keys, vectors = sequence.embed_texts(texts, TINY_RANDOM, tmp_path)
    cache = next(tmp_path.glob("text-embeddings-*.parquet"))
    stamp = cache.stat().st_mtime_ns
    again_keys, again = sequence.embed_texts(texts, TINY_RANDOM, tmp_path)
    assert again_keys == keys and np.array_equal(again, vectors)
    assert cache.stat().st_mtime_ns == stamp  # nothing new: the cache was not rewritten
    more = pd.concat([texts, pd.DataFrame({"text_key": ["c3"], "text": ["green vase"]})])
    more_keys, more_vectors = sequence.embed_texts(more, TINY_RANDOM, tmp_path)
    assert more_keys[:2] == keys and np.array_equal(more_vectors[:2], vectors)
    assert np.allclose(np.linalg.norm(more_vectors, axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def fitted(pipeline_run: Settings, tmp_path_factory: pytest.TempPathFactory):
    cfg = replace(
        TrainConfig.load(TINY), max_epochs=1, max_train_rows=600, max_val_rows=300, holdout_rows=300
    )
    frames = read_training_data(pipeline_run.warehouse_path, cfg).frames
    cache = tmp_path_factory.mktemp("sequence-cache")
    texts = sequence.read_texts(pipeline_run.warehouse_path)
    first = sequence.SequenceClassifier(cfg, texts, cache).fit(
        frames["train"], frames["validation"]
    )
    return cfg, frames, cache, texts, first


def test_the_pretrained_encoder_is_reused_when_the_sequences_have_not_changed(fitted) -> None:
    cfg, frames, cache, texts, first = fitted
    assert not first.fitted.pretrain_reused and first.fitted.pretrain_losses
    second = sequence.SequenceClassifier(cfg, texts, cache).fit(
        frames["train"], frames["validation"]
    )
    assert second.fitted.pretrain_reused
    assert second.fitted.pretrain_losses == first.fitted.pretrain_losses
    # The same settings on other sequences (half the validation cutoff's customers): afresh.
    other = sequence.SequenceClassifier(cfg, texts, cache).fit(
        frames["train"], frames["validation"].iloc[::2]
    )
    assert not other.fitted.pretrain_reused


def test_without_its_sequences_the_model_reads_them_for_the_rows_it_samples_and_scores(
    fitted, pipeline_run: Settings
) -> None:
    """As the backtest fits it: frames without the JSON sequences, read from the warehouse
    only for the rows drawn and scored; the same model as from frames that carry them."""
    cfg, frames, cache, texts, first = fitted
    bare = {name: f.drop(columns=[SEQUENCE_COLUMN]) for name, f in frames.items()}
    with pytest.raises(ValueError, match="no event_sequence column"):
        sequence.SequenceClassifier(cfg, texts, cache).fit(bare["train"], bare["validation"])
    model = sequence.SequenceClassifier(cfg, texts, cache, source=pipeline_run.warehouse_path)
    model.PREDICT_CHUNK_ROWS = 7  # scored in chunks, each reading its own rows' sequences
    model.fit(bare["train"], bare["validation"])
    assert model.fitted.pretrain_reused  # the same pretraining sequences came back
    expected, got = first.predict(frames["test"]), model.predict(bare["test"])
    np.testing.assert_allclose(got.churn_prob, expected.churn_prob, atol=1e-5)
    np.testing.assert_allclose(got.tier_probs, expected.tier_probs, atol=1e-5)


def test_sequence_pyfunc_round_trip_gives_the_same_predictions(
    fitted, pipeline_run: Settings, tmp_path: Path
) -> None:
    cfg, frames, _, _, model = fitted
    frame = to_model_input(frames["test"].head(60))
    tiers, churn, embeddings = sequence.predict_sequence_net(
        model.fitted.net, model.fitted.vocab, model.scaler, frame
    )
    model_dir = registry.save_sequence_artifacts(
        tmp_path / "artifacts",
        model.fitted.net,
        model.fitted.vocab,
        model.scaler,
        {"fused_dim": cfg.fused_dim},
    )
    assert json.loads((model_dir / "config.json").read_text())["spec"] == asdict(model.fitted.spec)
    registry.configure(
        pipeline_run.mlflow_tracking_uri, pipeline_run.mlflow_artifacts_dir, "sequence-roundtrip"
    )
    with mlflow.start_run():
        version = registry.log_pyfunc(
            registry.SequencePyfunc(), model_dir, frame.head(3), "sequence-roundtrip", "test"
        )
    loaded = mlflow.pyfunc.load_model(f"models:/sequence-roundtrip/{version}")
    out = loaded.predict(frame, params={"return_embedding": True})
    # It publishes coherent tiers: P(lapsed) is its churn probability, high and active share
    # the rest as its tier head does; the tier chosen with its decision weights.
    published = coherent_tiers(tiers, churn)
    assert np.allclose(out[["p_high", "p_active", "p_lapsed"]].to_numpy(), published, atol=1e-5)
    assert np.allclose(out["churn_probability"].to_numpy(), churn, atol=1e-5)
    assert np.allclose(out["p_lapsed"], out["churn_probability"])
    weights = model.fitted.net.tier_decision.cpu().numpy()
    assert (out["value_tier"] == np.array(TIERS)[decide_tiers(published, weights)]).all()
    assert not np.allclose(published, tiers, atol=1e-3)  # the tier head alone says otherwise
    # A net saved before coherent tiers (no coherent flag) loads and publishes its tier head's.
    state = torch.load(model_dir / "net.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "coherent"}, model_dir / "net.pt")
    old = registry.SequencePyfunc()
    old.load_context(SimpleNamespace(artifacts={"model_dir": str(model_dir)}))
    before = old.predict(None, frame)
    assert np.allclose(before[["p_high", "p_active", "p_lapsed"]].to_numpy(), tiers, atol=1e-5)
    assert np.allclose(out.filter(like="embedding_").to_numpy(), embeddings, atol=1e-5)
    assert SEQUENCE_COLUMN in loaded.metadata.get_input_schema().input_names()
    # A customer's events change its scores: the model reads the sequence.
    emptied = frame.assign(**{SEQUENCE_COLUMN: "{}"})
    changed = loaded.predict(emptied)["churn_probability"].to_numpy()
    assert not np.allclose(changed, churn, atol=1e-4)


def test_a_sequence_champion_scores_every_customer_through_valueloop_score(
    fitted, pipeline_run: Settings, tmp_path: Path
) -> None:
    """On a copy of the pipeline's home: the sequence transformer made champion, then the real
    `valueloop score` (streamed scoring set, dbt scoring models, checks, publication)."""
    import shutil

    from tests.conftest import run_valueloop

    home = tmp_path / "home"
    shutil.copytree(
        pipeline_run.home,
        home,
        ignore=shutil.ignore_patterns("airflow", "logs", "landing", "mlartifacts", "exports"),
    )
    copied = load_settings(env={"VALUELOOP_PII_SALT": "s"}, home=home)
    _, _, _, _, model = fitted
    model_dir = registry.save_sequence_artifacts(
        tmp_path / "artifacts",
        model.fitted.net,
        model.fitted.vocab,
        model.scaler,
        {"fused_dim": model.cfg.fused_dim},
    )
    registry.configure(copied.mlflow_tracking_uri, copied.mlflow_artifacts_dir, "sequence-scoring")
    name = TrainConfig().registered_model
    example = to_model_input(read_mart(copied.warehouse_path, "scoring_set").head(3))
    with mlflow.start_run():
        version = registry.log_pyfunc(
            registry.SequencePyfunc(), model_dir, example, name, "behaviour-sequence (test)"
        )
    mlflow.MlflowClient(copied.mlflow_tracking_uri).set_registered_model_alias(
        name, registry.CHAMPION, version
    )
    result = run_valueloop("score", home=home, timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as con:
        customers = con.execute("select count(*) from marts.scoring_set").fetchone()[0]
        scores = con.execute(
            "select count(*), min(model_version), max(model_version), "
            "count(*) filter (where churn_probability between 0 and 1), "
            "count(*) filter (where churn_reasons <> '' and tier_reasons is not null), "
            "count(*) filter (where abs(p_lapsed - churn_probability) < 1e-9) "
            "from marts.customer_scores"
        ).fetchone()
    # Every customer scored by this version, with reason codes from integrated gradients, and
    # one answer to "will they lapse": P(lapsed) is the churn probability.
    assert scores == (customers, version, version, customers, customers, customers)


def test_sequence_reason_codes_name_real_features_and_events_and_are_stable(fitted) -> None:
    _, frames, _, _, model = fitted
    frame = to_model_input(frames["test"].head(40))
    net, vocab, scaler = model.fitted.net, model.fitted.vocab, model.scaler
    why = reasons.explain_sequence(net, vocab, scaler, frame)
    again = reasons.explain_sequence(net, vocab, scaler, frame, batch_size=7)
    pd.testing.assert_frame_equal(why, again)  # the same model and customer, the same reasons
    assert (why["churn_reasons"] != "").all()
    for row, (_, text) in zip(frame.to_dict("records"), why.iterrows(), strict=True):
        events = json.loads(row[SEQUENCE_COLUMN])
        known = {reasons.phrase(name, row) for name in scaler.columns} | {
            reasons._event_phrase(events, p) for p in range(len(events.get("kind", [])))
        }
        parts = text["churn_reasons"].split("; ")
        drivers = [d.rsplit(" (", 1)[0] for d in parts]
        assert 1 <= len(drivers) <= 3 and set(drivers) <= known, (drivers, row["customer_id"])
        assert all(d.endswith(("raises risk)", "lowers risk)")) for d in parts)


def test_a_coherent_sequence_model_explains_the_tiers_it_publishes(fitted, monkeypatch) -> None:
    """The fitted transformer publishes P(lapsed) = its churn probability (its tier head's
    probabilities are what an ensemble averages: ``raw``), and its reasons explain the
    published tiers: a lapsed one by the drivers that raise the churn risk."""
    _, frames, _, _, model = fitted
    frame = to_model_input(frames["test"].head(120))
    out, raw = model.predict(frame), model.raw(frame)
    assert float(model.fitted.net.coherent) == 1.0
    assert np.allclose(out.churn_prob, raw.churn_prob)
    assert np.allclose(out.tier_probs[:, TIERS.index("lapsed")], out.churn_prob)
    assert np.allclose(out.tier_probs, coherent_tiers(raw.tier_probs, raw.churn_prob))
    assert raw.tier_weights is None and out.tier_weights is not None
    net, vocab, scaler = model.fitted.net, model.fitted.vocab, model.scaler
    # ``raw`` is the tier head's own, which the stack averages (not coherent).
    head, _, _ = sequence.predict_sequence_net(net, vocab, scaler, frame)
    np.testing.assert_allclose(raw.tier_probs, head, atol=1e-6)
    assert not np.allclose(raw.tier_probs[:, TIERS.index("lapsed")], raw.churn_prob, atol=1e-3)
    stacked = MeanEnsemble([model], "one")._raw(frame)[1][0]
    np.testing.assert_allclose(stacked.tier_probs, head, atol=1e-6)
    # The decision weights were fitted on the coherent tiers of the validation rows it drew.
    drawn = md5_sample(frames["validation"], model.cfg.max_val_rows, model.cfg.seed, "value_tier")
    tiers, churn, _ = sequence.predict_sequence_net(net, vocab, scaler, drawn)
    expected = fit_tier_weights(coherent_tiers(tiers, churn), tier_index(drawn["value_tier"]))
    np.testing.assert_allclose(out.tier_weights, expected, rtol=1e-6)
    published = pd.Series([TIERS[i] for i in out.predicted_tiers()], index=frame.index)
    why = reasons.explain_sequence(net, vocab, scaler, frame, published=published)
    pd.testing.assert_frame_equal(  # the same model and customers, the same reasons
        why, reasons.explain_sequence(net, vocab, scaler, frame, published=published)
    )
    # Without the published tiers, it works them out the same way.
    pd.testing.assert_frame_equal(why, reasons.explain_sequence(net, vocab, scaler, frame))
    # Batched otherwise (other padding), the same attributions up to float rounding.
    member = SimpleNamespace(fitted=model.fitted, scaler=scaler)
    one, other = (
        reasons.ensemble_attributions(SimpleNamespace(members=[member]), frame, published, size)
        for size in (256, 7)
    )
    np.testing.assert_allclose(one.churn_attr, other.churn_attr, atol=1e-6)
    np.testing.assert_allclose(one.tier_attr, other.tier_attr, atol=1e-6)
    # The same customers in another order: the same attributions, in that order (customers are
    # explained in batches sorted by sequence length, then put back).
    perm = np.random.default_rng(0).permutation(len(frame))
    shuffled = reasons.ensemble_attributions(
        SimpleNamespace(members=[member]), frame.iloc[perm], published.iloc[perm]
    )
    np.testing.assert_allclose(shuffled.churn_attr, one.churn_attr[perm], atol=1e-6)
    np.testing.assert_allclose(shuffled.tier_attr, one.tier_attr[perm], atol=1e-6)
    # The tier's integrated gradients are taken for the buyers only (a lapsed tier is explained
    # by the churn drivers): the same as taking them for everyone.
    buyers = (published != "lapsed").sum()
    assert 5 < buyers < len(published) - 5, published.value_counts()
    full = reasons._sequence_attributions
    monkeypatch.setattr(reasons, "_sequence_attributions", lambda *a: full(*a[:6]))
    every = reasons.ensemble_attributions(SimpleNamespace(members=[member]), frame, published)
    np.testing.assert_allclose(one.tier_attr, every.tier_attr, atol=1e-6)
    monkeypatch.undo()
    # A net saved before coherent tiers is explained by its tier head: each customer's tier
    # reasons support the tier its head and decision weights choose for them.
    import copy

    old = copy.deepcopy(net)
    old.coherent.fill_(0.0)
    head_probs, _, _ = sequence.predict_sequence_net(old, vocab, scaler, frame)
    chosen = np.array(TIERS)[decide_tiers(head_probs, old.tier_decision.cpu().numpy())]
    said = reasons.explain_sequence(old, vocab, scaler, frame)["tier_reasons"].str.extract(
        r"\(supports (\w+)\)"
    )[0]
    assert said.notna().mean() > 0.8
    assert (said.dropna() == pd.Series(chosen, index=frame.index)[said.dropna().index]).all()
    said = why["tier_reasons"].str.extract(r"\(supports (\w+)\)")[0].dropna()
    assert (said == published[said.index]).all() and len(said) > 0.8 * len(frame)
    lapsed = published.index[published == "lapsed"]
    assert len(lapsed) > 0, published.value_counts()
    for i in lapsed:
        raising = [
            p.rsplit(" (", 1)[0]
            for p in why.at[i, "churn_reasons"].split("; ")
            if "raises risk" in p
        ]
        supports = [p.rsplit(" (", 1)[0] for p in why.at[i, "tier_reasons"].split("; ")]
        assert supports[: len(raising)] == raising, (why.loc[i].to_dict(), raising)


def test_an_event_phrase_describes_the_event_at_its_position_newest_first() -> None:
    events = {
        "kind": ["order", "return", "review", "order"],  # oldest first, as the mart has it
        "days_before": [90, 60, 30, 2],
        "amount": [10.0, -4.5, 0.0, 25.25],
        "rating": [0, 0, 4, 0],
    }
    assert reasons._event_phrase(events, 0) == "order of 25.25, 2 days ago"
    assert reasons._event_phrase(events, 1) == "4-star review, 30 days ago"
    assert reasons._event_phrase(events, 2) == "return of 4.50, 60 days ago"
    vocab = sequence.SequenceVocab([], [], max_events=4)
    arrays = sequence.parse_sequences(
        pd.Series(
            [
                json.dumps(
                    {
                        **events,
                        "quantity": [1] * 4,
                        "lines": [1] * 4,
                        "category": ["x"] * 4,
                        "texts": [[]] * 4,
                    }
                )
            ]
        ),
        vocab,
    )
    # Position 0 is the newest event in the arrays too; gaps run back to the older event.
    assert np.isclose(arrays.numbers[0, 0, 0], np.log1p(2))
    assert np.isclose(arrays.numbers[0, 0, 1], np.log1p(28))
    assert arrays.kinds[0].tolist() == [1, 4, 2, 1]


def test_the_oldest_kept_event_keeps_its_gap_when_the_sequence_is_cut() -> None:
    events = {
        "kind": ["order"] * 5,
        "days_before": [100, 80, 50, 20, 5],
        "amount": [1.0] * 5,
        "quantity": [1] * 5,
        "lines": [1] * 5,
        "rating": [0] * 5,
        "category": ["x"] * 5,
        "texts": [[]] * 5,
    }
    arrays = sequence.parse_sequences(
        pd.Series([json.dumps(events)]), sequence.SequenceVocab([], [], max_events=3)
    )
    assert arrays.lengths.tolist() == [3]
    # Kept: 5, 20 and 50 days before; the 50-day one's previous event was 30 days earlier.
    assert np.allclose(arrays.numbers[0, :, 1], np.log1p([15, 30, 30]))


def _stack(fitted, settings: Settings):
    """The stack of the fitted transformer with LightGBM and BG/NBD, as training builds it."""
    from ml.baselines import BGNBDBaseline, LightGBMBaseline
    from ml.data import horizon_days
    from ml.ensemble import MeanEnsemble

    _, frames, _, _, model = fitted
    numeric = model.scaler.columns
    trees = LightGBMBaseline(numeric, 0).fit(frames["train"], frames["validation"])
    btyd = BGNBDBaseline(horizon_days(settings.warehouse_path)).fit(frames["train"])
    return MeanEnsemble([model, trees, btyd], "stack").calibrate(frames["validation"])


def test_the_stack_round_trips_through_its_registered_pyfunc(
    fitted, pipeline_run: Settings, tmp_path: Path
) -> None:
    import pickle

    _, frames, _, _, model = fitted
    stack = _stack(fitted, pipeline_run)
    frame = to_model_input(frames["test"].head(50))
    expected = stack.predict(frame)
    restored = pickle.loads(pickle.dumps(stack))
    assert restored.members[0].texts is None  # the training inputs are not pickled
    model_dir = registry.save_baseline_artifacts(tmp_path / "stack", stack, model.scaler)
    out = registry.python_model_predict(registry.BaselinePyfunc(), model_dir, frame)
    assert np.allclose(out["churn_probability"], expected.churn_prob, atol=1e-6)
    assert out["value_tier"].tolist() == [TIERS[i] for i in expected.predicted_tiers()]
    # One answer to one question: lapsed is churned, so the published P(lapsed) is the
    # calibrated churn probability, and the three tiers still sum to one.
    assert np.allclose(out["p_lapsed"], out["churn_probability"], atol=1e-9)
    assert np.allclose(out[["p_high", "p_active", "p_lapsed"]].sum(axis=1), 1.0)


def test_the_stacks_reasons_come_from_all_three_members(fitted, pipeline_run: Settings) -> None:
    """The stack's reason codes combine its transformer's integrated gradients (features and
    events), its LightGBM's TreeSHAP and its BG/NBD's Shapley values: each member moves
    them, every driver is a real feature or event of the customer, and a fixed model gives
    the same words."""
    import torch

    _, frames, _, _, model = fitted
    stack = _stack(fitted, pipeline_run)
    frame = to_model_input(frames["test"].head(60))
    out = stack.predict(frame)
    published = pd.Series([TIERS[i] for i in out.predicted_tiers()], index=frame.index)
    found = reasons.ensemble_attributions(stack, frame, published)
    width = len(found.features)
    assert found.sequence_features == list(model.scaler.columns)
    assert np.abs(found.mean_churn_attr[:, width:]).sum() > 0  # the transformer's events
    assert np.allclose(
        found.mean_churn,
        np.mean([getattr(m, "raw", m.predict)(frame).churn_prob for m in stack.members], axis=0),
        atol=1e-2 if torch.cuda.is_available() else 1e-5,  # bf16 predictions on a GPU
    )
    # BG/NBD's exact Shapley values are a third of the mean, on its three features, and
    # nothing else: the same stack with a BG/NBD fitted before it kept a reference differs by
    # exactly that.
    btyd = stack.members[2]
    shapley = reasons.btyd_shapley(btyd, frame)
    assert np.abs(shapley).sum() > 0
    reference = btyd.reference
    del btyd.reference
    without = reasons.ensemble_attributions(stack, frame, published)
    btyd.reference = reference
    expected = np.zeros_like(found.mean_churn_attr)
    expected[:, [found.features.index(f) for f in reasons.BTYD_FEATURES]] = shapley / 3
    assert np.allclose(found.mean_churn_attr - without.mean_churn_attr, expected, atol=1e-7)
    why = reasons.explain(stack, frame, published)
    assert why.equals(reasons.explain(stack, frame, published))
    for row, (_, text) in zip(frame.to_dict("records"), why.iterrows(), strict=True):
        events = json.loads(row[SEQUENCE_COLUMN])
        known = {reasons.phrase(name, row) for name in found.features} | {
            reasons._event_phrase(events, p) for p in range(len(events.get("kind", [])))
        }
        kinds, days = events.get("kind", []), events.get("days_before", [])
        last_day = {  # folded into "no order in N days" (reasons.fold_last_order)
            reasons._event_phrase(events, len(kinds) - 1 - k)
            for k in range(len(kinds))
            if kinds[k] == "order" and days[k] == row["recency_days"]
        }
        for column in ("churn_reasons", "tier_reasons"):
            drivers = [d.rsplit(" (", 1)[0] for d in text[column].split("; ") if d]
            assert set(drivers) <= known - last_day, (column, drivers, row["customer_id"])
        assert 1 <= len(text["churn_reasons"].split("; ")) <= 3
