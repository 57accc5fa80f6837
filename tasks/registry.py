"""The MLflow model registry: register a challenger, and move `champion` only through the gate."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from tasks.config import LoadedConfig
from tasks.evaluate import Evaluation
from tasks.tracking import RunRef, StageRecord, tracking_uri

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class ModelVersionRef:
    """A registered model version and what it was trained on."""

    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class PromotionDecision:
    """Whether the challenger becomes champion, with both scores and the reason in words."""

    promote: bool
    reason: str
    metric: str
    challenger_score: float
    champion_score: float | None = None
    champion_version: str | None = None

    def tags(self) -> dict[str, str]:
        return {
            "promotion.decision": "promoted" if self.promote else "rejected",
            "promotion.reason": self.reason,
            "promotion.metric": self.metric,
            "promotion.challenger_score": f"{self.challenger_score:.6f}",
            "promotion.champion_score": (
                "" if self.champion_score is None else f"{self.champion_score:.6f}"
            ),
            "promotion.champion_version": self.champion_version or "",
        }


def decide_promotion(
    metric: str,
    challenger_score: float,
    champion: ModelVersionRef | None,
    champion_score: float | None,
    *,
    min_value: float,
    min_improvement: float,
) -> PromotionDecision:
    """The gate: the challenger must reach `min_value` and beat the champion by `min_improvement`."""
    decision = {"metric": metric, "challenger_score": challenger_score}
    if champion is not None:
        decision |= {"champion_score": champion_score, "champion_version": champion.version}
    if challenger_score < min_value:
        reason = f"{metric} {challenger_score:.4f} is below the minimum {min_value:.4f}"
        return PromotionDecision(False, reason, **decision)
    if champion is None:
        reason = f"no champion yet; {metric} {challenger_score:.4f} meets the minimum {min_value:.4f}"
        return PromotionDecision(True, reason, **decision)
    if champion_score is None:
        reason = f"champion v{champion.version} cannot be scored on this test data; promote by hand"
        return PromotionDecision(False, reason, **decision)
    needed = champion_score + min_improvement
    if challenger_score > needed:
        reason = (
            f"{metric} {challenger_score:.4f} beats champion v{champion.version}'s "
            f"{champion_score:.4f} by more than {min_improvement:.4f}"
        )
        return PromotionDecision(True, reason, **decision)
    reason = (
        f"{metric} {challenger_score:.4f} does not beat champion v{champion.version}'s "
        f"{champion_score:.4f} by more than {min_improvement:.4f}"
    )
    return PromotionDecision(False, reason, **decision)


def _version_ref(version) -> ModelVersionRef:
    return ModelVersionRef(version.name, str(version.version), version.run_id, dict(version.tags))


def aliased_version(uri: str, name: str, alias: str) -> ModelVersionRef | None:
    """The version an alias points to, or None when the model or the alias does not exist."""
    try:
        return _version_ref(MlflowClient(uri).get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            return None
        raise


def register_challenger(
    uri: str, model_uri: str, name: str, run_id: str, tags: dict[str, str]
) -> ModelVersionRef:
    """Register the model as a new version and point `challenger` at it."""
    mlflow.set_tracking_uri(uri)
    version = mlflow.register_model(model_uri, name, tags={**tags, "run_id": run_id})
    client = MlflowClient(uri)
    client.set_registered_model_alias(name, CHALLENGER, str(version.version))
    return _version_ref(client.get_model_version(name, str(version.version)))


def load_keras_model(model_uri: str, uri: str):
    """A registered or logged model loaded back as Keras, to score it on fresh data."""
    import mlflow.tensorflow

    mlflow.set_tracking_uri(uri)
    return mlflow.tensorflow.load_model(model_uri)


def record_decision(
    uri: str, challenger: ModelVersionRef, run_id: str, decision: PromotionDecision
) -> None:
    """Write the decision on the version and the run, then move `champion` if it passed."""
    client = MlflowClient(uri)
    for key, value in decision.tags().items():
        client.set_model_version_tag(challenger.name, challenger.version, key, value)
        client.set_tag(run_id, key, value)
    if decision.promote:
        client.set_registered_model_alias(challenger.name, CHAMPION, challenger.version)


# --- Prefect steps -------------------------------------------------------------------------------

_MLFLOW_RETRIES = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=2)}


def config_fingerprint(loaded: LoadedConfig) -> str:
    """sha256 of the resolved training config, to tell later whether a retrain would differ."""
    tree = loaded.config.model_dump(mode="json", exclude={"demo"})
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


@task(name="register-challenger", cache_policy=NO_CACHE, **_MLFLOW_RETRIES)
def register_challenger_step(
    run: RunRef, record: StageRecord, table, loaded: LoadedConfig, data_version: str
) -> ModelVersionRef:
    """Register the final stage's model, recording what it was trained on."""
    config = loaded.config
    if record.model_uri is None:
        raise ValueError(f"stage {record.stage} logged no model to register")
    tags = {
        "data_version": data_version,
        "config_sha256": config_fingerprint(loaded),
        "architecture": config.base.architecture,
        "image_size": str(config.data.image_size),
        "stage": record.stage,
        "classes": json.dumps(list(table.classes)),
    }
    return register_challenger(run.tracking_uri, record.model_uri, config.registry.model_name, run.run_id, tags)


@task(name="promote-if-better", cache_policy=NO_CACHE)
def promote_if_better(
    run: RunRef, challenger: ModelVersionRef, evaluation: Evaluation, table, loaded: LoadedConfig
) -> PromotionDecision:
    """Score the current champion on this run's test split, then apply the gate."""
    config = loaded.config
    metric = config.evaluation.primary_metric
    uri = tracking_uri(loaded.project)
    champion = aliased_version(uri, challenger.name, CHAMPION)
    champion_score = None
    if champion is not None and champion.version != challenger.version:
        champion_score = score_version(uri, champion, table, config, metric)
    decision = decide_promotion(
        metric,
        evaluation.metric(metric),
        champion,
        champion_score,
        min_value=config.registry.min_value,
        min_improvement=config.registry.min_improvement,
    )
    record_decision(uri, challenger, run.run_id, decision)
    return decision


def score_version(uri: str, version: ModelVersionRef, table, config, metric: str) -> float | None:
    """A registered version's metric on this test split, or None when it predicts other classes."""
    from tasks.data import image_dataset
    from tasks.evaluate import evaluate_model

    model = load_keras_model(version.uri, uri)
    classes = json.loads(version.tags.get("classes", "null") or "null")
    if classes is not None and tuple(classes) != tuple(table.classes):
        return None
    if model.output_shape[-1] != len(table.classes):
        return None
    size = int(model.input_shape[1])
    test = image_dataset(table.split("test"), table.classes, size, config.data.batch_size)
    return evaluate_model(model, test, table.classes).metric(metric)
