"""The model stage through real components: Lightning, a real MLflow store and registry."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import duckdb
import mlflow
import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch

from ml import backtest, registry
from ml.config import DEFAULT_CONFIG, TrainConfig
from ml.data import (
    TIERS,
    CustomerDataModule,
    load_splits,
    read_mart,
    read_training_data,
    snapshot_training_data,
    tier_index,
    to_model_input,
)
from ml.evaluate import (
    Predictions,
    coherent_tiers,
    compute_metrics,
    decide_tiers,
    fit_tier_weights,
    paired_bootstrap,
)
from ml.model import CustomerModel, load_tokenizer
from ml.predict import OUTPUT_COLUMNS, predict_net
from ml.train import CLASSIC_LABELS, train
from valueloop import jobs, pipeline, transform
from valueloop.config import REPO_ROOT, Settings, load_settings
from valueloop.simulator import SimulationConfig, generate

TINY = Path(DEFAULT_CONFIG).with_name("tiny.yaml")
# Another process with the warehouse open for writing (DuckDB: one writing process).
HOLD_FOR_WRITING = """
import sys, duckdb
con = duckdb.connect(sys.argv[1])
print("holding", flush=True)
sys.stdin.readline()
"""


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = load_settings(env={"VALUELOOP_PII_SALT": "s"}, home=tmp_path_factory.mktemp("model"))
    generate(settings.demo_dir, SimulationConfig(customers=1_500, seed=13))
    jobs.ingest_path(settings, settings.demo_dir, "simulator")
    transform.build(settings, quiet=True)
    return settings


def run_training(settings: Settings, source: Path | None = None, **overrides) -> object:
    return train(
        TrainConfig.load(TINY, **overrides),
        source or settings.warehouse_path,
        settings.mlflow_tracking_uri,
        settings.mlflow_artifacts_dir,
        settings.home / "cache",
    )


@pytest.fixture(scope="module")
def trained(warehouse: Settings):
    return run_training(warehouse)


def test_training_reads_a_stratified_sample_drawn_in_duckdb_that_is_the_same_every_time(
    warehouse: Settings,
) -> None:
    whole = read_mart(warehouse.warehouse_path, "training_set")
    cfg = TrainConfig.load(
        TINY, max_train_rows=900, max_val_rows=400, holdout_rows=300, pretrain_max_customers=250
    )
    data = read_training_data(warehouse.warehouse_path, cfg)
    frames = data.frames
    for name, cap in (("train", 900), ("validation", 400), ("test", 300)):
        rows = whole[whole["split"] == name]
        assert len(rows) > cap  # the caps bite on this shop
        assert abs(len(frames[name]) - cap) <= 3  # per-stratum rounding only
        assert frames[name]["split"].eq(name).all()
        assert frames[name]["customer_cutoff_id"].is_unique
        assert frames[name]["customer_cutoff_id"].is_monotonic_increasing
        if name != "test":  # stratified by value tier
            share = frames[name]["value_tier"].value_counts(normalize=True)
            expected = rows["value_tier"].value_counts(normalize=True)
            assert (share - expected).abs().max() < 0.01
    # Every column, exactly the mart's rows: the sample is a subset, not a copy that drifted.
    picked = whole.set_index("customer_cutoff_id").loc[frames["train"]["customer_cutoff_id"]]
    assert picked["event_sequence"].tolist() == frames["train"]["event_sequence"].tolist()
    validation = set(whole.loc[whole["split"] == "validation", "event_sequence"])
    assert len(data.pretrain_sequences) == 250 and set(data.pretrain_sequences) <= validation

    again = read_training_data(warehouse.warehouse_path, cfg)
    for name in frames:
        assert again.frames[name]["customer_cutoff_id"].equals(frames[name]["customer_cutoff_id"])
    assert again.pretrain_sequences.equals(data.pretrain_sequences)
    other = read_training_data(warehouse.warehouse_path, replace(cfg, seed=cfg.seed + 1))
    assert not other.frames["test"]["customer_cutoff_id"].equals(
        frames["test"]["customer_cutoff_id"]
    )
    uncapped = replace(cfg, max_train_rows=None, max_val_rows=None, holdout_rows=None)
    everything = read_training_data(warehouse.warehouse_path, uncapped).frames
    assert sum(len(f) for f in everything.values()) == whole["split"].isin(frames).sum()


def _tiny_module(settings: Settings, cfg: TrainConfig):
    frames, scaler = load_splits(cfg, settings.warehouse_path)
    tokenizer = load_tokenizer(cfg.encoder)
    data = CustomerDataModule.from_config(frames, tokenizer, scaler, cfg, settings.home / "cache")
    module = CustomerModel.from_config(cfg, tokenizer.vocab_size, len(scaler.columns))
    return frames, scaler, tokenizer, data, module


def _mean_loss(module: CustomerModel, loader) -> float:
    module.eval()
    with torch.no_grad():
        losses = [module.compute_loss(batch)[0].item() for batch in loader]
    module.train()
    return float(np.mean(losses))


def test_a_tiny_bert_trains_on_cpu_and_the_loss_goes_down(warehouse: Settings) -> None:
    cfg = TrainConfig.load(TINY)
    pl.seed_everything(cfg.seed, workers=True)
    _, _, _, data, module = _tiny_module(warehouse, cfg)
    data.prepare_data()
    data.setup("fit")
    before = _mean_loss(module, data.train_dataloader())
    pl.Trainer(
        accelerator="cpu",
        max_steps=40,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    ).fit(module, data.train_dataloader())
    after = _mean_loss(module, data.train_dataloader())
    assert after < before * 0.9, (before, after)


def test_every_model_is_tracked_side_by_side(warehouse: Settings, trained) -> None:
    client = mlflow.MlflowClient(warehouse.mlflow_tracking_uri)
    children = client.search_runs(
        [client.get_run(trained.parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{trained.parent_run_id}'",
    )
    by_model = {r.data.tags["valueloop.model"]: r for r in children}
    assert {"lightgbm", "bg_nbd", "rfm_rule", "ensemble", "transformer"} <= set(by_model)
    for name in ("lightgbm", "bg_nbd", "rfm_rule", "ensemble", "transformer"):
        run = by_model[name]
        assert {"test_churn_roc_auc", "test_churn_brier", "test_churn_pr_auc"} <= set(
            run.data.metrics
        )
        plots = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
        assert {"roc_pr.png", "calibration.png", "lift_gain.png"} <= plots
    transformer = by_model["transformer"]
    assert "val_score" in transformer.data.metrics  # per-epoch metrics from Lightning
    assert "tier_macro_f1" in trained.metrics["transformer"]
    parent = client.get_run(trained.parent_run_id)
    assert parent.data.params["data_sha256"] == transformer.data.params["data_sha256"]
    # and what it was trained on, for drift at scoring (valueloop.monitoring)
    assert {"dataset_fingerprint.json", "drift_reference.json"} <= {
        a.path for a in client.list_artifacts(trained.parent_run_id)
    }


def test_the_stack_is_tracked_and_chosen_on_the_validation_cutoff(
    warehouse: Settings, trained
) -> None:
    client = mlflow.MlflowClient(warehouse.mlflow_tracking_uri)
    experiment = client.get_run(trained.parent_run_id).info.experiment_id
    # This training's runs only: other tests of the module may have trained since.
    children = f"tags.mlflow.parentRunId = '{trained.parent_run_id}'"
    [stack] = client.search_runs(
        [experiment], filter_string=f"{children} and tags.`valueloop.model` = 'stack'"
    )
    [transformer] = client.search_runs(
        [experiment], filter_string=f"{children} and tags.`valueloop.model` = 'transformer'"
    )
    on_validation = {
        m: stack.data.metrics[f"validation_{m}_customer_score"] for m in ("transformer", "stack")
    }
    expected = "stack" if on_validation["stack"] > on_validation["transformer"] else "transformer"
    assert trained.challenger_name == expected
    assert "test_churn_roc_auc" in stack.data.metrics
    [pretraining] = client.search_runs(
        [experiment],
        filter_string=f"tags.mlflow.parentRunId = '{transformer.info.run_id}' "
        "and tags.`valueloop.kind` = 'pretraining'",
    )
    assert pretraining.data.metrics["pretrain_loss"] > 0
    assert int(pretraining.data.params["pretrain_sequences"]) > 0
    # Fresh or reused from the module's cache, depending on what trained first (the reuse
    # itself is tested in test_sequence.py); either way it is recorded.
    assert pretraining.data.params["pretrain_reused"] in ("True", "False")
    version = client.get_model_version(TrainConfig().registered_model, trained.challenger_version)
    assert version.description.startswith(
        "stack of the behaviour-sequence" if expected == "stack" else "behaviour-sequence"
    )


def test_a_backtest_of_the_same_data_decides_between_the_transformer_and_its_stack(
    warehouse: Settings, trained, tmp_path: Path
) -> None:
    client = mlflow.MlflowClient(warehouse.mlflow_tracking_uri)
    children = f"tags.mlflow.parentRunId = '{trained.parent_run_id}'"
    experiment = client.get_run(trained.parent_run_id).info.experiment_id
    [stack] = client.search_runs(
        [experiment], filter_string=f"{children} and tags.`valueloop.model` = 'stack'"
    )
    # No backtest had run on this store: the validation cutoff decided, and said so.
    assert stack.data.tags["valueloop.chosen_by"] == "validation cutoff"
    assert stack.data.tags["valueloop.chosen"] == trained.challenger_name

    # A store of its own, so the module's champion is untouched.
    uri, artifacts = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlartifacts"
    cfg = TrainConfig.load(TINY)
    result = backtest.run(
        warehouse.warehouse_path,
        uri,
        artifacts,
        n_cutoffs=2,
        n_bootstrap=5,
        models=("transformer", "stack", "lightgbm", "ensemble"),
        cfg=cfg,
        cache_dir=warehouse.home / "cache",
    )
    latest = result.origins[-1]["cutoff"]
    ruling = backtest.verdict(
        uri, warehouse.warehouse_path, latest, ("transformer", "stack"), "customer_score"
    )
    assert ruling is not None and ruling.run_id == result.parent_run_id
    mean = result.per_cutoff[result.per_cutoff.cutoff == "mean"].set_index(["model", "metric"])
    for model in ("transformer", "stack"):
        parts = [mean.loc[(model, m), "value"] for m in ("churn_roc_auc", "tier_macro_f1")]
        assert ruling.scores[model] == pytest.approx(np.mean(parts))
    # A backtest of other labels (another latest cutoff) or of other models says nothing.
    assert (
        backtest.verdict(uri, warehouse.warehouse_path, "1999-01-01", ("stack",), "customer_score")
        is None
    )
    assert (
        backtest.verdict(uri, warehouse.warehouse_path, latest, ("rfm_rule",), "customer_score")
        is None
    )
    # Nor does a backtest of other model settings; one of these settings does.
    tag = mlflow.MlflowClient(uri).get_run(result.parent_run_id).data.tags
    assert tag["valueloop.model_config"] == cfg.model_fingerprint()
    models = ("transformer", "stack")
    other = replace(cfg, seq_hidden=cfg.seq_hidden * 2).model_fingerprint()
    assert (
        backtest.verdict(uri, warehouse.warehouse_path, latest, models, "customer_score", other)
        is None
    )
    gate_only = replace(cfg, promotion_margin=0.5, experiment="elsewhere").model_fingerprint()
    assert (
        backtest.verdict(uri, warehouse.warehouse_path, latest, models, "customer_score", gate_only)
        == ruling
    )
    # Nor a backtest run by an earlier method (other labels judged, other models compared).
    store = mlflow.MlflowClient(uri)
    store.set_tag(result.parent_run_id, "valueloop.backtest_method", "2026-11-28.2")
    assert backtest.verdict(uri, warehouse.warehouse_path, latest, models, "customer_score") is None
    store.set_tag(result.parent_run_id, "valueloop.backtest_method", backtest.METHOD)
    assert (
        backtest.verdict(uri, warehouse.warehouse_path, latest, models, "customer_score") == ruling
    )
    # Its paired leads between every two models: one pair's lead is the other's loss, and the
    # difference of their mean scores.
    full = backtest.verdict(
        uri,
        warehouse.warehouse_path,
        latest,
        ("transformer", "stack", "lightgbm", "ensemble"),
        "customer_score",
    )
    assert full is not None and len(full.leads) == 4 * 3
    for a, b in [("stack", "ensemble"), ("transformer", "lightgbm"), ("ensemble", "lightgbm")]:
        diff, low, high = full.lead(a, b)
        assert diff == pytest.approx(full.scores[a] - full.scores[b])
        assert (diff, low, high) == pytest.approx(
            tuple(-x for x in (full.lead(b, a)[i] for i in (0, 2, 1)))
        )
        assert low <= high
    assert full.lead("stack", "bg_nbd") is None  # BG/NBD predicts no tier: no customer_score
    # The pipeline trains from a snapshot of the warehouse (Airflow, the loop): the backtest
    # of the same data speaks for it. The same rows with one label changed (a correction
    # since) are other data: it does not.
    snapshot = snapshot_training_data(warehouse.warehouse_path, tmp_path / "snapshot")
    assert backtest.verdict(uri, snapshot, latest, models, "customer_score") == ruling
    corrected = tmp_path / "corrected"
    shutil.copytree(snapshot, corrected)
    with duckdb.connect() as con:
        con.execute(
            f"copy (select * replace (case when row_number() over () = 1 then not is_churned"
            f" else is_churned end as is_churned) from '{snapshot / 'training_set.parquet'}')"
            f" to '{corrected / 'training_set.parquet'}' (format parquet)"
        )
    assert backtest.verdict(uri, corrected, latest, models, "customer_score") is None

    report = train(cfg, snapshot, uri, artifacts, warehouse.home / "cache")
    assert report.challenger_name == ruling.winner
    client = mlflow.MlflowClient(uri)
    [stack] = client.search_runs(
        [client.get_run(report.parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{report.parent_run_id}' "
        "and tags.`valueloop.model` = 'stack'",
    )
    assert stack.data.tags["valueloop.chosen_by"] == f"backtest {ruling.run_id}"
    assert stack.data.metrics["backtest_stack_customer_score"] == pytest.approx(
        ruling.scores["stack"]
    )
    # The registry says which won and why, with the backtest's figures.
    version = client.get_model_version(cfg.registered_model, report.challenger_version)
    assert f"backtest run {ruling.run_id[:12]}" in version.description
    assert f"{ruling.winner} {ruling.scores[ruling.winner]:.4f}" in version.description
    # This store had no champion: the first-run gate compared the challenger with the better
    # classic model on the same backtest, paired, not on the one holdout.
    best = max(("lightgbm", "ensemble"), key=full.scores.__getitem__)
    decision = report.decision
    assert decision.compared_with == CLASSIC_LABELS[best]
    assert f"backtest run {ruling.run_id[:12]}" in decision.reason
    assert decision.challenger_score == pytest.approx(full.scores[report.challenger_name])
    assert decision.champion_score == pytest.approx(full.scores[best])
    diff, low, high = full.lead(report.challenger_name, best)
    assert f"[{low:+.4f}, {high:+.4f}]" in decision.reason
    if decision.promote:
        assert low > 0 and diff >= cfg.promotion_margin
    champion = client.get_model_version_by_alias(cfg.registered_model, registry.CHAMPION)
    assert (str(champion.version) == report.challenger_version) == decision.promote


def test_the_first_champion_is_the_best_of_transformer_lightgbm_and_the_ensemble(
    warehouse: Settings, trained
) -> None:
    client = mlflow.MlflowClient(warehouse.mlflow_tracking_uri)
    name = TrainConfig().registered_model
    champion = client.get_model_version_by_alias(name, registry.CHAMPION)
    challenger = client.get_model_version_by_alias(name, registry.CHALLENGER)
    assert str(challenger.version) == trained.challenger_version
    scores = {m: trained.metrics[m]["customer_score"] for m in ("lightgbm", "ensemble")}
    classic = max(scores, key=scores.get)
    chosen = trained.challenger_name  # the transformer, or its stack with the classics
    assert chosen in ("transformer", "stack")
    beat = trained.metrics[chosen]["customer_score"] >= (
        scores[classic] + TrainConfig().promotion_margin
    )
    assert (str(champion.version) == str(challenger.version)) == (beat and trained.decision.promote)
    if str(champion.version) != str(challenger.version):
        # The registry says which classic model is champion, and why.
        assert champion.description.startswith(
            "LightGBM baseline" if classic == "lightgbm" else "LightGBM + BG/NBD ensemble"
        )
        assert f"is champion: the {chosen} did not beat it" in champion.description
    # Whichever it is, the champion scores a DataFrame through the one interface.
    holdout = to_model_input(read_mart(warehouse.warehouse_path, "scoring_set").head(20))
    mlflow.set_tracking_uri(warehouse.mlflow_tracking_uri)
    out = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(holdout)
    assert list(out.columns) == OUTPUT_COLUMNS
    assert np.allclose(out[["p_high", "p_active", "p_lapsed"]].sum(axis=1), 1.0, atol=1e-5)


def test_pyfunc_round_trip_gives_the_same_predictions(warehouse: Settings, tmp_path: Path) -> None:
    cfg = replace(TrainConfig.load(TINY), max_steps=5)
    pl.seed_everything(cfg.seed)
    frames, scaler, tokenizer, _, module = _tiny_module(warehouse, cfg)
    frame = to_model_input(frames["test"].head(50))
    tiers, churn, embeddings = predict_net(module.net, tokenizer, scaler, frame, cfg.max_length)
    model_dir = registry.save_transformer_artifacts(
        tmp_path / "artifacts",
        module.net,
        tokenizer,
        scaler,
        {
            "encoder": cfg.encoder,
            "fused_dim": cfg.fused_dim,
            "dropout": cfg.dropout,
            "max_length": cfg.max_length,
        },
    )
    registry.configure(warehouse.mlflow_tracking_uri, warehouse.mlflow_artifacts_dir, "roundtrip")
    with mlflow.start_run():
        version = registry.log_pyfunc(
            registry.TransformerPyfunc(),
            model_dir,
            frame.head(3),
            "roundtrip-model",
            "round trip test",
        )
    registry.set_alias("roundtrip-model", "challenger", version)
    loaded = mlflow.pyfunc.load_model("models:/roundtrip-model@challenger")
    out = loaded.predict(frame, params={"return_embedding": True})
    assert np.allclose(out[["p_high", "p_active", "p_lapsed"]].to_numpy(), tiers, atol=1e-5)
    assert np.allclose(out["churn_probability"].to_numpy(), churn, atol=1e-5)
    assert np.allclose(out.filter(like="embedding_").to_numpy(), embeddings, atol=1e-5)
    assert loaded.metadata.get_input_schema() is not None
    # A net saved before calibration, decision weights and coherent tiers loads as it was.
    state = torch.load(model_dir / "net.pt", weights_only=True)
    for name in ("churn_scale", "churn_shift", "tier_decision", "coherent"):
        del state[name]
    torch.save(state, model_dir / "net.pt")
    old = registry.TransformerPyfunc()
    old.load_context(SimpleNamespace(artifacts={"model_dir": str(model_dir)}))
    before = old.predict(None, frame)
    assert np.allclose(before[["p_high", "p_active", "p_lapsed"]].to_numpy(), tiers, atol=1e-5)
    assert (before["value_tier"] == np.array(TIERS)[tiers.argmax(1)]).all()
    uri = "models:/roundtrip-model@challenger/requirements.txt"
    logged = Path(mlflow.artifacts.download_artifacts(uri))
    assert logged.read_text().split() == registry.pip_requirements()


def test_the_model_requirements_cover_every_package_ml_imports() -> None:
    """What a logged model's environment installs (registry.MODEL_REQUIREMENTS) names the
    distribution of every third-party module imported anywhere under ml/."""
    named = {name.lower() for name in registry.MODEL_REQUIREMENTS}
    owners = metadata.packages_distributions()
    imported: dict[str, str] = {}
    for path in (REPO_ROOT / "ml").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("ml", "valueloop"):
                    imported.setdefault(top, str(path.relative_to(REPO_ROOT)))
    assert "torch" in imported and "lightgbm" in imported  # the scan sees real imports
    missing = {
        top: where
        for top, where in imported.items()
        if not {d.lower() for d in owners.get(top, [])} & named
    }
    assert missing == {}, f"imported under ml/ but not in registry.MODEL_REQUIREMENTS: {missing}"
    assert all("+" not in pin for pin in registry.pip_requirements())


def test_the_gate_refuses_a_deliberately_worse_model(warehouse: Settings, trained) -> None:
    client = mlflow.MlflowClient(warehouse.mlflow_tracking_uri)
    name = TrainConfig().registered_model
    before = str(client.get_model_version_by_alias(name, registry.CHAMPION).version)
    # Trained from a snapshot while another process holds the warehouse for writing, as the
    # train task does while the next ingest writes.
    snapshot = pipeline.snapshot_training_data(warehouse, "manual__2026-01-05T00:00:00+00:00")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_FOR_WRITING, str(warehouse.warehouse_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(duckdb.IOException, match="lock"):
            read_mart(warehouse.warehouse_path, "training_set")
        # Frozen at initialisation: a model that learned nothing.
        worse = run_training(
            warehouse,
            snapshot,
            max_steps=1,
            encoder_lr=1e-12,
            sequence_lr=1e-12,
            head_lr=1e-12,
            pretrain_epochs=0,
            stack=False,
        )
    finally:
        holder.communicate("done\n", timeout=60)
    assert read_mart(snapshot, "training_set").equals(
        read_mart(warehouse.warehouse_path, "training_set")
    )
    assert not worse.decision.promote
    assert "does not beat champion" in worse.decision.reason
    assert str(client.get_model_version_by_alias(name, registry.CHAMPION).version) == before
    assert (
        str(client.get_model_version_by_alias(name, registry.CHALLENGER).version)
        == worse.challenger_version
    )
    gate = client.get_model_version(name, worse.challenger_version)
    assert client.get_run(gate.run_id).data.tags["gate.decision"] == "refused"


def test_promote_rolls_back_and_refuses_unknown_versions(warehouse: Settings, trained) -> None:
    name = TrainConfig().registered_model
    client = mlflow.MlflowClient(warehouse.mlflow_tracking_uri)
    current = str(client.get_model_version_by_alias(name, registry.CHAMPION).version)
    registry.promote(warehouse.mlflow_tracking_uri, name, trained.challenger_version)
    assert (
        str(client.get_model_version_by_alias(name, registry.CHAMPION).version)
        == trained.challenger_version
    )
    registry.promote(warehouse.mlflow_tracking_uri, name, current)
    with pytest.raises(ValueError, match="has no version 999"):
        registry.promote(warehouse.mlflow_tracking_uri, name, "999")


@pytest.mark.parametrize(
    ("challenger", "incumbent", "promote", "why"),
    [
        ({"s": 0.80, "churn_brier": 0.15}, {"s": 0.79, "churn_brier": 0.15}, True, "beats"),
        ({"s": 0.792, "churn_brier": 0.15}, {"s": 0.79, "churn_brier": 0.15}, False, "does not"),
        ({"s": 0.85, "churn_brier": 0.20}, {"s": 0.79, "churn_brier": 0.15}, False, "calibration"),
        (
            {"s": 0.85, "churn_brier": 0.15, "churn_ece": 0.09},
            {"s": 0.79, "churn_brier": 0.15, "churn_ece": 0.03},
            False,
            "ECE",
        ),
    ],
)
def test_gate_rules(challenger, incumbent, promote, why) -> None:
    decision = registry.decide(challenger, incumbent, "champion v1", "s", 0.005, 0.01)
    assert decision.promote is promote and why in decision.reason


def test_the_gate_refuses_a_lead_within_the_noise() -> None:
    challenger, incumbent = {"s": 0.80, "churn_brier": 0.15}, {"s": 0.79, "churn_brier": 0.15}
    noisy = registry.decide(challenger, incumbent, "v1", "s", 0.005, 0.01, (-0.004, 0.024))
    assert not noisy.promote and "within the noise" in noisy.reason
    clear = registry.decide(challenger, incumbent, "v1", "s", 0.005, 0.01, (0.002, 0.018))
    assert clear.promote and "[+0.0020, +0.0180]" in clear.reason


def test_paired_bootstrap_separates_a_real_lead_from_a_tie() -> None:
    rng = np.random.default_rng(0)
    n = 2000
    churn = rng.integers(0, 2, n)
    tiers = rng.integers(0, 3, n)
    spend = rng.exponential(10, n)
    onehot = np.eye(3)[tiers]

    def model(signal: float, seed: int) -> Predictions:
        noise = np.random.default_rng(seed)
        p = np.clip(0.5 + signal * (churn - 0.5) + noise.normal(0, 0.25, n), 0.01, 0.99)
        t = signal * onehot + noise.random((n, 3))
        return Predictions(p, t / t.sum(1, keepdims=True), spend + noise.normal(0, 5, n))

    strong, weak, twin = model(0.5, 1), model(0.2, 2), model(0.5, 3)
    point, low, high = paired_bootstrap(tiers, churn, spend, strong, weak, n_resamples=200)
    assert point > 0 and low > 0
    point, low, high = paired_bootstrap(tiers, churn, spend, strong, twin, n_resamples=200)
    assert low < 0 < high


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_step_on_gpu_in_bf16(warehouse: Settings) -> None:
    cfg = TrainConfig.load(TINY)
    _, _, _, data, module = _tiny_module(warehouse, cfg)
    data.prepare_data()
    data.setup("fit")
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(module, data.train_dataloader())
    assert next(module.parameters()).is_cuda
    assert np.isfinite(trainer.callback_metrics["train_loss_step"].item())


def test_config_rejects_unknown_settings(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("max_epochs: 2\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown setting"):
        TrainConfig.load(path)


def _fine_tune_in_processes(settings: Settings, tmp_path: Path, strategy: str, devices: int):
    out = tmp_path / f"{strategy}-{devices}.json"
    command = [sys.executable, "-m", "ml.distributed", "--warehouse"]
    command += [str(settings.warehouse_path), "--config", str(TINY), "--out", str(out)]
    command += ["--strategy", strategy, "--devices", str(devices)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_ddp_fine_tuning_on_two_cpu_processes_matches_one_process(
    warehouse: Settings, tmp_path: Path
) -> None:
    single = _fine_tune_in_processes(warehouse, tmp_path, "auto", 1)
    ddp = _fine_tune_in_processes(warehouse, tmp_path, "ddp", 2)
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    assert ddp["strategy"] == "DDPStrategy"
    # Each process trains on half the batches; the metrics are the same ones, synchronised.
    assert ddp["train_batches_per_process"] == -(-single["train_batches_per_process"] // 2)
    assert ddp["metrics"].keys() == single["metrics"].keys() >= {"val_score", "val_loss"}
    assert all(np.isfinite(v) for v in ddp["metrics"].values())


def test_coherent_tiers_put_the_churn_probability_in_lapsed_and_keep_the_buyers_ratio() -> None:
    tiers = np.array([[0.2, 0.6, 0.2], [0.0, 0.0, 1.0], [0.5, 0.3, 0.2]])
    churn = np.array([0.5, 0.4, 0.0])
    out = coherent_tiers(tiers, churn)
    assert np.allclose(out[:, 2], churn) and np.allclose(out.sum(1), 1.0)
    assert np.allclose(out[0], [0.125, 0.375, 0.5])  # high : active stays 1 : 3
    assert np.allclose(out[1], [0.3, 0.3, 0.4])  # no buyer tier given: shared evenly
    assert np.allclose(out[2], [0.625, 0.375, 0.0])


class _Member:
    """A fitted member with fixed outputs (the ensembles' averaging is pure logic)."""

    def __init__(self, churn: np.ndarray, tiers: np.ndarray | None) -> None:
        self.churn, self.tiers = churn, tiers

    def predict(self, frame: pd.DataFrame) -> Predictions:
        return Predictions(self.churn, self.tiers, np.arange(len(frame), dtype=float))

    raw = predict  # its own outputs, which the ensembles average


def _tier_problem(
    seed: int, high_above: float, lapsed_prob: float, n: int = 400
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Labels (four in ten churned, the top spenders high), a churn probability that leans
    to the churned, and tier probabilities whose P(lapsed) is a flat ``lapsed_prob``: what
    the ensembles average, made incoherent on purpose."""
    rng = np.random.default_rng(seed)
    churned = rng.random(n) < 0.4
    spend = rng.random(n)
    labels = np.where(churned, "lapsed", np.where(spend > high_above, "high", "active"))
    churn = np.clip(churned * 0.5 + rng.random(n) * 0.5, 0.01, 0.99)
    buyers = 1 - lapsed_prob
    high = spend * (1 - high_above)
    raw = np.column_stack([high, buyers - high, np.full(n, lapsed_prob)])
    return pd.DataFrame({"is_churned": churned, "value_tier": labels}), churn, raw


def test_the_lightgbm_bg_nbd_ensemble_publishes_coherent_tiers_with_weights_fitted_on_them() -> (
    None
):
    from ml.ensemble import AveragedEnsemble

    frame, churn, raw = _tier_problem(seed=2, high_above=0.8, lapsed_prob=0.4)
    ensemble = AveragedEnsemble.__new__(AveragedEnsemble)  # members with fixed outputs
    ensemble.lightgbm, ensemble.bg_nbd = _Member(churn, raw), _Member(churn, None)
    ensemble.lightgbm.fit = ensemble.bg_nbd.fit = lambda *frames: None
    ensemble.fit(frame, frame)
    out = ensemble.predict(frame)
    assert np.allclose(out.tier_probs[:, 2], out.churn_prob)
    assert np.allclose(out.tier_probs.sum(1), 1.0)
    expected = fit_tier_weights(
        coherent_tiers(raw, out.churn_prob), tier_index(frame["value_tier"])
    )
    assert np.allclose(out.tier_weights, expected)
    del ensemble.coherent  # pickled before: LightGBM's own tiers, no weights
    before = ensemble.predict(frame)
    assert np.allclose(before.tier_probs, raw) and before.tier_weights is None


def test_the_stack_publishes_coherent_tiers_and_one_pickled_before_keeps_its_own() -> None:
    from ml.ensemble import MeanEnsemble

    frame, churn, raw = _tier_problem(seed=1, high_above=0.7, lapsed_prob=0.5)
    stack = MeanEnsemble([_Member(churn, raw), _Member(churn, None)], "stack").calibrate(frame)
    out = stack.predict(frame)
    assert np.allclose(out.tier_probs[:, 2], out.churn_prob)
    assert np.allclose(out.tier_probs.sum(1), 1.0)
    # A stack registered before: no `coherent` attribute; its weights were fitted on its
    # own averaged tiers, which it keeps publishing.
    del stack.coherent
    assert np.allclose(stack.predict(frame).tier_probs, raw)


def test_tier_decision_weights_raise_macro_f1_without_touching_the_probabilities() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    labels = rng.choice(3, size=n, p=[0.1, 0.6, 0.3])
    # Probabilities that lean to the common "active" tier.
    logits = np.eye(3)[labels] * 0.8 + rng.normal(0, 0.6, (n, 3))
    logits[:, 1] += 0.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    weights = fit_tier_weights(probs, labels)
    plain = Predictions(probs[:, 0], probs, probs[:, 0])
    weighted = Predictions(probs[:, 0], probs, probs[:, 0], weights)
    f1 = {
        name: compute_metrics(labels, (labels == 2).astype(int), np.ones(n), p)["tier_macro_f1"]
        for name, p in (("plain", plain), ("weighted", weighted))
    }
    assert not np.allclose(weights, 1.0) and f1["weighted"] > f1["plain"] + 0.01, (weights, f1)
    # Already balanced, well-separated tiers keep weights of 1.
    clean = np.eye(3)[labels] * 0.9 + 0.05
    assert np.allclose(fit_tier_weights(clean, labels), 1.0)


def test_the_document_transformer_is_calibrated_on_the_validation_cutoff(
    warehouse: Settings, tmp_path: Path
) -> None:
    """`--model document`: its churn logit is Platt-scaled on the validation cutoff, so the
    registered model's mean churn probability there is the cutoff's churn rate (a logistic
    fit with an intercept matches them), and the ECE before and after is logged."""
    uri, artifacts = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlartifacts"
    cfg = TrainConfig.load(TINY, model="document", stack=False)
    report = train(cfg, warehouse.warehouse_path, uri, artifacts, warehouse.home / "cache")
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs(
        [client.get_run(report.parent_run_id).info.experiment_id],
        "metrics.validation_churn_ece_calibrated >= 0",
    )
    assert len(runs) == 1 and "validation_churn_ece_uncalibrated" in runs[0].data.metrics
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registered_model}/{report.challenger_version}")
    validation = read_training_data(warehouse.warehouse_path, cfg).frames["validation"]
    out = model.predict(validation)
    churn = out["churn_probability"]
    assert churn.mean() == pytest.approx(validation["is_churned"].mean(), abs=0.01)
    # Its tiers agree with it (P(lapsed) is the churn probability), chosen with decision
    # weights fitted on the validation cutoff.
    assert np.allclose(out["p_lapsed"], churn)
    assert np.allclose(out[["p_high", "p_active", "p_lapsed"]].sum(axis=1), 1.0)
    python_model = model.unwrap_python_model()
    net = python_model.net
    assert float(net.coherent) == 1.0
    probs = out[["p_high", "p_active", "p_lapsed"]].to_numpy()
    chosen = np.array(TIERS)[decide_tiers(probs, net.tier_decision.cpu().numpy())]
    assert (out["value_tier"] == chosen).all()
    # The weights are those that maximise macro-F1 on the coherent tiers of the validation rows.
    tiers, p, _ = predict_net(
        net,
        python_model.tokenizer,
        python_model.scaler,
        validation,
        python_model.meta["max_length"],
        cfg.eval_batch_size,
    )
    expected = fit_tier_weights(coherent_tiers(tiers, p), tier_index(validation["value_tier"]))
    np.testing.assert_allclose(net.tier_decision.cpu().numpy(), expected, rtol=1e-6)
