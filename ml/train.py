"""Train: baselines and the transformer on the same splits, tracked in MLflow, then the gate.

One parent run per training job, with a nested run per model (LightGBM, BG/NBD, RFM rule, the
LightGBM + BG/NBD ensemble, transformer), so the MLflow UI shows them side by side. Every model
is scored on the same frozen holdout; the transformer becomes `challenger` and is promoted to
`champion` only if it beats the incumbent (the champion, or on the first run the better of
LightGBM and the ensemble, which otherwise becomes champion with the reason in its registry
description).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger

from ml import backtest, registry, sequence
from ml.baselines import BGNBDBaseline, LightGBMBaseline, RFMRuleBaseline
from ml.config import TrainConfig
from ml.data import (
    TIERS,
    CustomerDataModule,
    FeatureScaler,
    data_taken_at,
    horizon_days,
    label_corrections,
    numeric_columns,
    read_training_data,
    tier_index,
    to_model_input,
)
from ml.data import fingerprint as dataset_fingerprint
from ml.ensemble import AveragedEnsemble, MeanEnsemble
from ml.evaluate import (
    Predictions,
    compute_metrics,
    fit_tier_weights,
    paired_bootstrap,
    plot_all,
    published_tiers,
)
from ml.model import CustomerModel, load_tokenizer
from ml.predict import as_predictions, predict_net

log = logging.getLogger(__name__)
# The classic champion candidates, by model name.
CLASSIC_LABELS = {"lightgbm": "LightGBM baseline", "ensemble": "LightGBM + BG/NBD ensemble"}


@dataclass(frozen=True)
class TrainReport:
    parent_run_id: str
    metrics: dict[str, dict[str, float]]  # model name -> holdout metrics
    challenger_version: str
    champion_version: str
    decision: registry.GateDecision
    challenger_name: str = "transformer"  # or "stack"

    def summary(self) -> str:
        names = list(self.metrics)
        keys = [
            "customer_score",
            "churn_roc_auc",
            "churn_pr_auc",
            "churn_brier",
            "tier_macro_f1",
            "top_decile_revenue_capture",
        ]
        width = max(len(n) for n in names)
        lines = [f"{'model':<{width}}  " + "  ".join(f"{k:>14}" for k in keys)]
        for name in names:
            values = [self.metrics[name].get(k) for k in keys]
            lines.append(
                f"{name:<{width}}  "
                + "  ".join(f"{v:>14.4f}" if v is not None else f"{'-':>14}" for v in values)
            )
        verdict = "promoted to champion" if self.decision.promote else "not promoted"
        lines.append(
            f"{self.challenger_name} v{self.challenger_version} is challenger, {verdict}: "
            f"{self.decision.reason}; champion is v{self.champion_version}"
        )
        lines.append(f"MLflow parent run {self.parent_run_id}")
        return "\n".join(lines)


def _labels(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        tier_index(frame["value_tier"]),
        frame["is_churned"].to_numpy(dtype="int64"),
        frame["future_spend"].to_numpy(dtype="float64"),
    )


def _log_evaluation(
    name: str, holdout: pd.DataFrame, predictions: Predictions, plots_dir: Path
) -> dict[str, float]:
    tiers, churn, spend = _labels(holdout)
    metrics = compute_metrics(tiers, churn, spend, predictions)
    mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()})
    for path in plot_all(tiers, churn, spend, predictions, plots_dir / name, name):
        mlflow.log_artifact(str(path), artifact_path="plots")
    return metrics


def _class_weights(train: pd.DataFrame) -> list[float]:
    counts = np.bincount(tier_index(train["value_tier"]), minlength=len(TIERS)).astype(float)
    weights = counts.sum() / (len(TIERS) * np.maximum(counts, 1.0))
    return weights.tolist()


def make_trainer(
    cfg: TrainConfig, mlflow_logger: MLFlowLogger | bool, checkpoint_dir: Path
) -> pl.Trainer:
    cuda = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    return pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=cfg.devices,
        strategy=cfg.strategy,
        precision="bf16-mixed" if cuda else "32-true",
        max_epochs=cfg.max_epochs,
        max_steps=cfg.max_steps,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        deterministic="warn" if cuda else True,
        logger=mlflow_logger,
        callbacks=[
            # strict=False: a run capped by max_steps may end before its first validation.
            EarlyStopping(monitor="val_score", mode="max", patience=cfg.patience, strict=False),
            ModelCheckpoint(
                dirpath=checkpoint_dir,
                monitor="val_score",
                mode="max",
                save_top_k=1,
                filename="best",
            ),
        ],
        enable_progress_bar=True,
        log_every_n_steps=10,
        num_sanity_val_steps=0,
    )


def train_transformer(
    cfg: TrainConfig,
    frames: dict[str, pd.DataFrame],
    scaler: FeatureScaler,
    cache_dir: Path,
    work_dir: Path,
    tracking_uri: str,
    run_id: str,
):
    """Fine-tune with Lightning; returns the best net (on CPU or GPU) and its tokenizer."""
    tokenizer = load_tokenizer(cfg.encoder)
    data = CustomerDataModule.from_config(frames, tokenizer, scaler, cfg, cache_dir)
    module = CustomerModel.from_config(
        cfg, tokenizer.vocab_size, len(scaler.columns), _class_weights(frames["train"])
    )
    mlflow_logger = MLFlowLogger(tracking_uri=tracking_uri, run_id=run_id)
    trainer = make_trainer(cfg, mlflow_logger, work_dir / "checkpoints")
    trainer.fit(module, datamodule=data)
    best = trainer.checkpoint_callback.best_model_path
    if best:
        module = CustomerModel.load_from_checkpoint(best, map_location="cpu")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return module.net.to(device), tokenizer, trainer


def train(
    cfg: TrainConfig,
    warehouse: Path,
    tracking_uri: str,
    artifacts_dir: Path,
    cache_dir: Path,
    reason: str = "manual",
) -> TrainReport:
    """Train the transformer and the baselines, evaluate, log and gate. ``warehouse`` is the
    DuckDB file or a training snapshot folder (ml.data.snapshot_training_data)."""
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    data = read_training_data(warehouse, cfg)
    frames, pretrain_rows = data.frames, data.pretrain_sequences
    scaler = FeatureScaler.fit(frames["train"], numeric_columns(frames["train"]))
    numeric = scaler.columns
    holdout = frames["test"]
    horizon = horizon_days(warehouse)
    registry.configure(tracking_uri, artifacts_dir, cfg.experiment)
    client = mlflow.MlflowClient(tracking_uri)
    metrics: dict[str, dict[str, float]] = {}
    predictions: dict[str, Predictions] = {}

    with (
        tempfile.TemporaryDirectory(prefix="valueloop-train-") as tmp,
        mlflow.start_run(run_name=f"train-{datetime.now(UTC):%Y%m%dT%H%M%S}") as parent,
    ):
        work = Path(tmp)
        info = dataset_fingerprint(frames)
        mlflow.log_params({f"cfg_{k}": v for k, v in cfg.to_dict().items()})
        mlflow.log_params(
            {
                "data_sha256": info["sha256"],
                "horizon_days": horizon,
                "label_corrections": label_corrections(warehouse),
                "data_taken_at": data_taken_at(warehouse),
                **{k: v for k, v in info.items() if k.endswith("_rows")},
            }
        )
        mlflow.log_dict(info, "dataset_fingerprint.json")
        # What this model is trained on, for drift at scoring. Imported here: the model's
        # shipped code (``ml``) must not need the platform where it is served.
        from valueloop import monitoring

        mlflow.log_dict(
            monitoring.reference_profiles(frames["train"]), monitoring.REFERENCE_ARTIFACT
        )
        mlflow.set_tags(
            {
                "valueloop.kind": "training",
                "warehouse": str(warehouse),
                "valueloop.retrain_reason": reason,
            }
        )

        lightgbm = LightGBMBaseline(numeric, cfg.seed).fit(frames["train"], frames["validation"])
        baselines = [
            (lightgbm, lightgbm.predict),
            (bgnbd := BGNBDBaseline(horizon).fit(frames["train"]), bgnbd.predict),
            (rfm := RFMRuleBaseline().fit(frames["train"]), rfm.predict),
            (
                ensemble := AveragedEnsemble(numeric, cfg.seed, horizon).fit(
                    frames["train"], frames["validation"]
                ),
                ensemble.predict,
            ),
        ]
        for baseline, predict in baselines:
            with mlflow.start_run(run_name=baseline.name, nested=True):
                mlflow.set_tags({"valueloop.model": baseline.name, "valueloop.kind": "baseline"})
                mlflow.log_params({"data_sha256": info["sha256"]})
                predictions[baseline.name] = predict(holdout)
                metrics[baseline.name] = _log_evaluation(
                    baseline.name, holdout, predictions[baseline.name], work / "plots"
                )

        with mlflow.start_run(run_name="transformer", nested=True) as child:
            encoder = "sequence" if cfg.model == "sequence" else cfg.encoder
            mlflow.set_tags(
                {
                    "valueloop.model": "transformer",
                    "valueloop.kind": "challenger",
                    "encoder": encoder,
                }
            )
            mlflow.log_params({"data_sha256": info["sha256"]})
            example = to_model_input(holdout.head(5))
            if cfg.model == "sequence":
                version, challenger, epochs = _train_sequence(
                    cfg,
                    frames,
                    scaler,
                    pretrain_rows,
                    warehouse,
                    cache_dir,
                    work,
                    tracking_uri,
                    child.info.run_id,
                    holdout,
                    metrics,
                    predictions,
                    (lightgbm, bgnbd),
                    example,
                    info,
                )
            elif cfg.model == "document":
                challenger = "transformer"
                version, epochs, predictions["transformer"] = _train_document(
                    cfg,
                    frames,
                    scaler,
                    cache_dir,
                    work,
                    tracking_uri,
                    child.info.run_id,
                    holdout,
                    metrics,
                    example,
                    info,
                )
            else:
                raise ValueError(f"model: {cfg.model!r} is neither 'sequence' nor 'document'")
            mlflow.log_metric("epochs_trained", epochs)
            mlflow.set_tag("valueloop.challenger", challenger)
            registry.set_alias(cfg.registered_model, registry.CHALLENGER, version)

            decision, champion = _gate(
                cfg,
                client,
                holdout,
                metrics,
                predictions,
                challenger,
                version,
                {"lightgbm": lightgbm, "ensemble": ensemble},
                scaler,
                example,
                work,
                info,
                (tracking_uri, warehouse),
            )
            mlflow.log_text(decision.to_json(), "gate_decision.json")
            gate_tags = {
                "gate.decision": "promoted" if decision.promote else "refused",
                "gate.reason": decision.reason,
                # on the registered version's run too: the registry's way to why it was trained
                "valueloop.retrain_reason": reason,
            }
            mlflow.set_tags(gate_tags)
            registered = client.get_model_version(cfg.registered_model, version).run_id
            if registered != child.info.run_id:  # the stack registers from its own run
                for key, value in gate_tags.items():
                    client.set_tag(registered, key, value)
            mlflow.log_metrics(
                {
                    "gate_challenger_score": decision.challenger_score,
                    **(
                        {"gate_incumbent_score": decision.champion_score}
                        if decision.champion_score is not None
                        else {}
                    ),
                }
            )
        mlflow.log_dict(metrics, "holdout_metrics.json")
        return TrainReport(parent.info.run_id, metrics, version, champion, decision, challenger)


def calibrate_document_churn(net, tokenizer, scaler, validation, cfg) -> tuple[float, float]:
    """Platt scaling of the document transformer's churn logit on the validation cutoff, as
    the sequence model's (``ml.sequence.calibrate_churn``). Returns the validation ECE before
    and after."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from ml.evaluate import expected_calibration_error

    def churn() -> np.ndarray:
        return predict_net(net, tokenizer, scaler, validation, cfg.max_length, cfg.eval_batch_size)[
            1
        ]

    labels = validation["is_churned"].to_numpy(dtype=int)
    p = np.clip(churn().astype("float64"), 1e-6, 1 - 1e-6)
    before = expected_calibration_error(labels, p)
    platt = LogisticRegression(C=1e6).fit(np.log(p / (1 - p))[:, None], labels)
    a, b = float(platt.coef_[0, 0]), float(platt.intercept_[0])
    with torch.no_grad():
        net.churn_shift.copy_(net.churn_shift * a + b)
        net.churn_scale.mul_(a)
    return before, expected_calibration_error(labels, churn())


def _train_document(
    cfg, frames, scaler, cache_dir, work, tracking_uri, run_id, holdout, metrics, example, info
) -> tuple[str, int, Predictions]:
    """The document transformer: fine-tune, evaluate on the holdout, register."""
    net, tokenizer, trainer = train_transformer(
        cfg, frames, scaler, cache_dir, work, tracking_uri, run_id
    )
    before, after = calibrate_document_churn(net, tokenizer, scaler, frames["validation"], cfg)
    log.info("churn calibration on the validation cutoff: ECE %.4f -> %.4f", before, after)
    mlflow.log_metrics(
        {"validation_churn_ece_uncalibrated": before, "validation_churn_ece_calibrated": after},
        run_id=run_id,
    )
    # Coherent tiers (p_lapsed is the calibrated churn probability) with decision weights
    # fitted on the validation cutoff, as the sequence model's.
    net.coherent.fill_(1.0)
    tiers, churn, _ = predict_net(
        net, tokenizer, scaler, frames["validation"], cfg.max_length, cfg.eval_batch_size
    )
    weights = fit_tier_weights(
        published_tiers(net, tiers, churn), tier_index(frames["validation"]["value_tier"])
    )
    net.tier_decision.copy_(torch.as_tensor(weights, dtype=net.tier_decision.dtype))
    tiers, churn, _ = predict_net(
        net, tokenizer, scaler, holdout, cfg.max_length, cfg.eval_batch_size, progress=True
    )
    holdout_predictions = as_predictions(published_tiers(net, tiers, churn), churn, weights)
    metrics["transformer"] = _log_evaluation(
        "transformer", holdout, holdout_predictions, work / "plots"
    )
    model_dir = registry.save_transformer_artifacts(
        work / "transformer",
        net,
        tokenizer,
        scaler,
        {
            "encoder": cfg.encoder,
            "fused_dim": cfg.fused_dim,
            "dropout": cfg.dropout,
            "max_length": cfg.max_length,
            "data_sha256": info["sha256"],
        },
    )
    version = registry.log_pyfunc(
        registry.TransformerPyfunc(),
        model_dir,
        example,
        cfg.registered_model,
        f"transformer ({cfg.encoder}) trained on {info['sha256'][:12]}",
    )
    return version, trainer.current_epoch, holdout_predictions


def _train_sequence(
    cfg,
    frames,
    scaler,
    pretrain_rows,
    warehouse,
    cache_dir,
    work,
    tracking_uri,
    run_id,
    holdout,
    metrics,
    predictions,
    classics,
    example,
    info,
) -> tuple[str, str, int]:
    """The behaviour-sequence transformer: CoLES pretraining (logged as a nested run, reused
    when the same sequences were pretrained before), fine-tuning, evaluation; then the stack
    of it with the classic models. The one of the two that wins the latest backtest of this
    data (the same warehouse, latest labelled cutoff and model settings, ``backtest.verdict``)
    is registered;
    without such a backtest, the one that scores better on the validation cutoff (never the
    holdout the gate reads). The version's description says which decided and the figures.
    Returns (version, name, epochs)."""
    mlflow_logger = MLFlowLogger(tracking_uri=tracking_uri, run_id=run_id)
    with mlflow.start_run(run_name="pretrain-coles", nested=True):
        mlflow.set_tags({"valueloop.kind": "pretraining", "objective": "CoLES"})
        fitted = sequence.fit_sequence_model(
            cfg,
            frames,
            scaler,
            pretrain_rows,
            sequence.read_texts(warehouse),
            cache_dir,
            lambda folder: make_trainer(cfg, mlflow_logger, folder),
            _class_weights(frames["train"]),
        )
        mlflow.log_params(
            {
                "pretrain_sequences": fitted.pretrain_sequences,
                "pretrain_reused": fitted.pretrain_reused,
                "texts_embedded": len(fitted.vocab.text_keys),
                "text_encoder": cfg.text_encoder,
            }
        )
        for epoch, loss in enumerate(fitted.pretrain_losses):
            mlflow.log_metric("pretrain_loss", loss, step=epoch)
    mlflow.log_metrics(
        {
            "validation_churn_ece_uncalibrated": fitted.validation_ece[0],
            "validation_churn_ece_calibrated": fitted.validation_ece[1],
        }
    )
    tiers, churn, _ = sequence.predict_sequence_net(
        fitted.net, fitted.vocab, scaler, holdout, cfg.eval_batch_size, progress=True
    )
    predictions["transformer"] = as_predictions(
        published_tiers(fitted.net, tiers, churn), churn, fitted.net.tier_decision.cpu().numpy()
    )
    metrics["transformer"] = _log_evaluation(
        "transformer", holdout, predictions["transformer"], work / "plots"
    )
    described = (
        f"behaviour-sequence transformer ({cfg.seq_layers} layers, {cfg.seq_hidden} wide, "
        f"CoLES-pretrained) trained on {info['sha256'][:12]}"
    )
    member = sequence.SequenceClassifier.from_fitted(cfg, fitted, scaler)
    if cfg.stack:
        stack = MeanEnsemble([member, *classics], "stack").calibrate(frames["validation"])
        validation = frames["validation"]
        on_validation = {
            name: compute_metrics(*_labels(validation), model.predict(validation))[
                cfg.primary_metric
            ]
            for name, model in (("transformer", member), ("stack", stack))
        }
        # The backtest of this data decides when there is one; else the validation cutoff.
        ruling = _backtest_of_this_data(
            cfg, (tracking_uri, warehouse), info, ("transformer", "stack")
        )
        if ruling is not None:
            chosen, chosen_by = ruling.winner, f"backtest {ruling.run_id}"
            basis = ruling.describe(cfg.primary_metric)
        else:
            chosen = max(on_validation, key=on_validation.__getitem__)
            chosen_by = "validation cutoff"
            basis = (
                f"{cfg.primary_metric} on the validation cutoff (no backtest of this data: "
                f"valueloop evaluate --backtest): stack {on_validation['stack']:.4f}, the "
                f"transformer alone {on_validation['transformer']:.4f}"
            )
        here = mlflow.get_run(run_id)
        # A sibling of the transformer's run under the training run, so the UI lists it
        # (created by the client: start_run only nests under the active run).
        sibling = mlflow.MlflowClient().create_run(
            here.info.experiment_id,
            run_name="stack",
            tags={"mlflow.parentRunId": here.data.tags["mlflow.parentRunId"]},
        )
        with mlflow.start_run(run_id=sibling.info.run_id, nested=True):
            mlflow.set_tags(
                {
                    "valueloop.model": "stack",
                    "valueloop.kind": "candidate",
                    "valueloop.chosen": chosen,
                    "valueloop.chosen_by": chosen_by,
                }
            )
            mlflow.log_params(
                {"data_sha256": info["sha256"], "members": "transformer,lightgbm,bg_nbd"}
            )
            predictions["stack"] = stack.predict(holdout)
            metrics["stack"] = _log_evaluation(
                "stack", holdout, predictions["stack"], work / "plots"
            )
            mlflow.log_metrics(
                {f"validation_{k}_{cfg.primary_metric}": v for k, v in on_validation.items()}
            )
            if ruling is not None:
                mlflow.log_metrics(
                    {f"backtest_{k}_{cfg.primary_metric}": v for k, v in ruling.scores.items()}
                )
            if chosen == "stack":
                why = (
                    f"stack of the {described}, LightGBM and BG/NBD (averaged, calibrated on "
                    f"the validation cutoff), chosen over the transformer alone by {basis}"
                )
                model_dir = registry.save_baseline_artifacts(work / "stack", stack, scaler)
                version = registry.log_pyfunc(
                    registry.BaselinePyfunc(), model_dir, example, cfg.registered_model, why
                )
                return version, "stack", fitted.epochs_trained
        described += f", chosen over its stack with LightGBM and BG/NBD by {basis}"
    model_dir = registry.save_sequence_artifacts(
        work / "transformer",
        fitted.net,
        fitted.vocab,
        scaler,
        {"fused_dim": cfg.fused_dim, "data_sha256": info["sha256"]},
    )
    version = registry.log_pyfunc(
        registry.SequencePyfunc(), model_dir, example, cfg.registered_model, described
    )
    return version, "transformer", fitted.epochs_trained


def _lead_interval(
    cfg: TrainConfig, holdout: pd.DataFrame, challenger: Predictions, incumbent: Predictions
) -> tuple[float, float] | None:
    """The paired bootstrap interval of the challenger's lead on the holdout (None: off)."""
    if cfg.gate_bootstrap <= 0:
        return None
    tiers, churn, spend = _labels(holdout)
    _, low, high = paired_bootstrap(
        tiers,
        churn,
        spend,
        challenger,
        incumbent,
        cfg.primary_metric,
        cfg.gate_bootstrap,
        cfg.seed,
    )
    return low, high


def _backtest_of_this_data(
    cfg: TrainConfig, source: tuple[str, Path], info: dict, models: tuple[str, ...]
) -> backtest.Verdict | None:
    """The latest backtest of this data and labels (the warehouse or a training snapshot of
    it) that ran ``models`` with this config's model settings (None: none)."""
    tracking_uri, data = source
    return backtest.verdict(
        tracking_uri,
        data,
        info["test_as_of"][-1],
        models,
        cfg.primary_metric,
        cfg.model_fingerprint(),
    )


def _gate(
    cfg: TrainConfig,
    client: mlflow.MlflowClient,
    holdout: pd.DataFrame,
    metrics: dict[str, dict[str, float]],
    predictions: dict[str, Predictions],
    challenger: str,
    version: str,
    classics: dict[str, LightGBMBaseline | AveragedEnsemble],
    scaler: FeatureScaler,
    example: pd.DataFrame,
    work: Path,
    info: dict,
    source: tuple[str, Path],
):
    name = cfg.registered_model
    incumbent_version = registry.champion_version(client, name)
    if incumbent_version is not None:
        # The champion scores the very same holdout rows through its registered pyfunc.
        scored = registry.holdout_scores(f"models:/{name}@{registry.CHAMPION}", holdout)
        tiers, churn, spend = _labels(holdout)
        incumbent = compute_metrics(tiers, churn, spend, scored)
        decision = registry.decide(
            metrics[challenger],
            incumbent,
            f"champion v{incumbent_version}",
            cfg.primary_metric,
            cfg.promotion_margin,
            cfg.calibration_tolerance,
            _lead_interval(cfg, holdout, predictions[challenger], scored),
        )
        if decision.promote:
            registry.set_alias(name, registry.CHAMPION, version)
        return decision, version if decision.promote else incumbent_version

    # First model: it must beat the better classic candidate (LightGBM or the LightGBM +
    # BG/NBD ensemble), else that one becomes champion. All of them are trained on this data
    # now, so a backtest of the same data compares them over its cutoffs, paired on the same
    # customers: when there is one, it decides; else the holdout. (A champion, above, is a
    # model trained earlier: only the holdout scores it.)
    primary = cfg.primary_metric
    # (The backtest's transformer is the sequence model: it says nothing of the document one;
    # and its paired leads are in customer_score, so a gate on another metric reads the holdout.)
    ruling = (
        _backtest_of_this_data(cfg, source, info, (challenger, *classics))
        if cfg.model == "sequence" and primary == backtest.LEADS_METRIC
        else None
    )
    if ruling is not None:
        best = max(classics, key=ruling.scores.__getitem__)
        found = ruling.lead(challenger, best)
    if ruling is not None and found is not None:
        classic = classics[best]
        scores = ruling.scores
        decision = registry.decide(
            {**metrics[challenger], primary: scores[challenger]},
            {**metrics[best], primary: scores[best]},
            CLASSIC_LABELS[best],
            primary,
            cfg.promotion_margin,
            cfg.calibration_tolerance,
            found[1:] if cfg.gate_bootstrap > 0 else None,  # 0: no test, as on the holdout
            f"{ruling.describe(primary)} (the frozen holdout: {challenger} "
            f"{metrics[challenger][primary]:.4f}, {best} {metrics[best][primary]:.4f}; "
            "calibration read there)",
        )
    else:
        classic = max(classics.values(), key=lambda m: metrics[m.name][primary])
        scores = {m: metrics[m][primary] for m in CLASSIC_LABELS if m in metrics}
        decision = registry.decide(
            metrics[challenger],
            metrics[classic.name],
            CLASSIC_LABELS[classic.name],
            primary,
            cfg.promotion_margin,
            cfg.calibration_tolerance,
            _lead_interval(cfg, holdout, predictions[challenger], predictions[classic.name]),
        )
    if decision.promote:
        registry.set_alias(name, registry.CHAMPION, version)
        return decision, version
    label = CLASSIC_LABELS[classic.name]
    why = (
        f"{label} ({primary} "
        + ", ".join(f"{m} {scores[m]:.4f}" for m in CLASSIC_LABELS if m in scores)
        + f") is champion: the {challenger} did not beat it ({decision.reason})"
    )
    with mlflow.start_run(run_name=f"{classic.name}-champion", nested=True):
        mlflow.set_tags(
            {
                "valueloop.model": classic.name,
                "valueloop.kind": "fallback-champion",
                "valueloop.champion_reason": why,
            }
        )
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics[classic.name].items()})
        model_dir = registry.save_baseline_artifacts(work / classic.name, classic, scaler)
        baseline_version = registry.log_pyfunc(
            registry.BaselinePyfunc(),
            model_dir,
            example,
            name,
            f"{label} trained on {info['sha256'][:12]} (first-run fallback): {why}",
        )
    registry.set_alias(name, registry.CHAMPION, baseline_version)
    return decision, baseline_version
