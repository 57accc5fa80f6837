"""Promotion: check the challenger loads, score it against the champion, move the alias if it passed.

Two gates, chosen by `registry.gate`:
- `non_inferiority` (the default) / `superiority`: both models predict the same test images and
  the paired difference decides, with a per-class recall check (tasks/registry/gate.py);
- `threshold`: the challenger's score must beat the champion's by `min_improvement`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from conf.registry import RegistryConfig
from tasks.data.stream import image_dataset
from tasks.inference.evaluate import Evaluation, score_predictions
from tasks.inference.forward import forward_pass
from tasks.registry.decision import (
    PromotionDecision,
    decide_promotion,
    promote_through_gate,
    record_decision,
)
from tasks.registry.gate import PairedPredictions, decide_paired
from tasks.registry.gate_power import non_inferiority_power
from tasks.registry.serving import log_serving_model
from tasks.registry.serving_model import IMAGE_COLUMN, LABEL_COLUMN, PROBABILITY_COLUMN
from tasks.registry.versions import (
    ModelVersionRef,
    config_fingerprint,
    load_keras_model,
    register_challenger,
)
from tasks.runtime.run_log import registration_line, run_logger
from tasks.runtime.timeouts import retry_if_store_locked
from tasks.runtime.tracking_server import tracking_uri, using_tracking_uri
from tasks.stages.preflight import LoadedConfig
from tasks.tracking.runs import RunRef, StageRecord


@dataclass(frozen=True)
class HeldOutPredictions:
    """A model's class probabilities for every test image, with the true class ids."""

    probabilities: np.ndarray
    labels: np.ndarray

    @property
    def predicted(self) -> np.ndarray:
        return np.argmax(self.probabilities, axis=-1)


def version_predictions(
    uri: str, version: ModelVersionRef, table, config
) -> HeldOutPredictions | None:
    """A registered version's predictions on this test split, or None when it has other classes.

    They are kept as an artifact of the version's run, named by the version and the test images'
    contents, so a version is run over a test set once: the gate of the retrain after the one
    that registered it reads them back (checked against the split's labels) instead.
    """

    classes = json.loads(version.tags.get("classes", "null") or "null")
    if classes is not None and tuple(classes) != tuple(table.classes):
        return None
    frame = table.split("test")
    labels = table.label_ids(frame)
    stored = _stored_predictions(uri, version, frame, labels, len(table.classes))
    if stored is not None:
        return stored
    model = load_keras_model(version.uri, uri)
    if model.output_shape[-1] != len(table.classes):
        return None
    size = int(model.input_shape[1])
    test = image_dataset(frame, table.classes, size, config.data.batch_size)
    probabilities, labels = forward_pass(model, test, len(frame), f"v{version.version}: test")
    predictions = HeldOutPredictions(probabilities, labels)
    _store_predictions(uri, version, frame, predictions)
    return predictions


PREDICTIONS_FOLDER = "gate_predictions"


def predictions_artifact(version: ModelVersionRef, frame) -> str:
    """Where a version's predictions for these test images are kept on its run: named by the
    version and a sha256 of every image's bytes and label, so other images, or the same paths
    with other contents, never read them."""
    digest = hashlib.sha256(f"{version.name}\0{version.version}\n".encode())
    for path, label in frame[["path", "label"]].itertuples(index=False):
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
        digest.update(f"{label}\n".encode())
    return f"{PREDICTIONS_FOLDER}/v{version.version}-{digest.hexdigest()[:16]}.npz"


def _stored_predictions(
    uri: str, version: ModelVersionRef, frame, labels: np.ndarray, class_count: int
) -> HeldOutPredictions | None:
    if version.run_id is None:
        return None
    client = MlflowClient(uri)
    artifact = predictions_artifact(version, frame)
    listed = {item.path for item in client.list_artifacts(version.run_id, PREDICTIONS_FOLDER)}
    if artifact not in listed:
        return None
    with tempfile.TemporaryDirectory(prefix="gate-") as folder:
        path = client.download_artifacts(version.run_id, artifact, folder)
        problem: str | None
        try:
            with np.load(path, allow_pickle=False) as saved:
                probabilities, saved_labels = saved["probabilities"], saved["labels"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            problem = f"unreadable ({error})"
        else:
            problem = _predictions_problem(probabilities, saved_labels, labels, class_count)
    if problem is None:
        run_logger().info(
            "v%s's predictions on the %d test images: read from its run %s",
            version.version,
            len(labels),
            version.run_id,
        )
        return HeldOutPredictions(probabilities, saved_labels)
    run_logger().warning(
        "v%s's stored test predictions %s on run %s are %s; running the model over the test "
        "images again.",
        version.version,
        artifact,
        version.run_id,
        problem,
    )
    return None


def _predictions_problem(
    probabilities: np.ndarray, saved: np.ndarray, labels: np.ndarray, class_count: int
) -> str | None:
    if probabilities.shape != (len(labels), class_count):
        return f"of shape {probabilities.shape}, not {(len(labels), class_count)}"
    if not np.array_equal(saved, labels):
        return "for other labels than this test split's"
    if not np.isfinite(probabilities).all():
        return "not all finite"
    return None


def keep_scored_predictions(
    uri: str, version: ModelVersionRef, table, evaluation: Evaluation
) -> None:
    """Keep the predictions a version's stage scored the test split with as the version's, so
    neither this gate nor the next retrain's runs the model over the test images again.

    Only when they are this split's, in its order: scored against its labels, they must give
    the evaluation's accuracy.
    """
    frame = table.split("test")
    probabilities, labels = evaluation.probabilities, table.label_ids(frame)
    if probabilities is None or probabilities.shape != (len(frame), len(table.classes)):
        return
    if score_predictions(probabilities, labels, table.classes).accuracy != evaluation.accuracy:
        return
    _store_predictions(uri, version, frame, HeldOutPredictions(probabilities, labels))


def _store_predictions(
    uri: str, version: ModelVersionRef, frame, predictions: HeldOutPredictions
) -> None:
    if version.run_id is None:
        return
    artifact = predictions_artifact(version, frame)
    folder, name = artifact.rsplit("/", 1)
    with tempfile.TemporaryDirectory(prefix="gate-") as temporary:
        path = Path(temporary) / name
        np.savez(path, probabilities=predictions.probabilities, labels=predictions.labels)
        MlflowClient(uri).log_artifact(version.run_id, str(path), folder)


def load_problem(uri: str, version: ModelVersionRef, table, config) -> str | None:
    """Why the version cannot serve, or None: loaded as a pyfunc from the registry, it must
    answer a request of real test image files as `mlflow models serve` would: one row per image,
    with its label, probability and a column per class."""
    import mlflow.pyfunc
    import pandas as pd

    paths = table.split("test").head(8)["path"]
    request = pd.DataFrame({IMAGE_COLUMN: [Path(path).read_bytes() for path in paths]})
    try:
        with using_tracking_uri(uri):
            answer = mlflow.pyfunc.load_model(version.uri).predict(request)
    except Exception as error:  # whatever stops serving stops the promotion
        return f"v{version.version} failed the load check ({type(error).__name__}: {error})"
    expected = [LABEL_COLUMN, PROBABILITY_COLUMN, *table.classes]
    columns = list(getattr(answer, "columns", []))
    if columns != expected or len(answer) != len(request):
        return (
            f"v{version.version} failed the load check: for {len(request)} images of "
            f"{len(table.classes)} classes it answered {len(answer)} rows with columns {columns}"
        )
    return None


def paired_decider(
    uri: str,
    challenger: ModelVersionRef,
    challenger_score: float,
    table,
    config,
) -> Callable[[ModelVersionRef | None], PromotionDecision]:
    """The paired gate against whichever champion is current when it is called.

    The challenger predicts the test set once, and only when there is a champion to compare it
    with: a first registration, or a challenger below min_value, scores nothing.
    """
    registry: RegistryConfig = config.registry
    metric = config.evaluation.primary_metric

    @functools.cache
    def challenger_predictions() -> HeldOutPredictions | None:
        return version_predictions(uri, challenger, table, config)

    def decide(champion: ModelVersionRef | None) -> PromotionDecision:
        def decided(promote: bool, reason: str, **more) -> PromotionDecision:
            version = None if champion is None else champion.version
            return PromotionDecision(
                promote, reason, metric, challenger_score, champion_version=version, **more
            )

        if challenger_score < registry.min_value:
            return decided(
                False, f"{metric} {challenger_score:.4f} is below the minimum {registry.min_value}"
            )
        if champion is None:
            return decided(
                True, f"no champion yet; {metric} {challenger_score:.4f} meets the minimum"
            )
        theirs = version_predictions(uri, champion, table, config)
        mine = None if theirs is None else challenger_predictions()
        if mine is None or theirs is None:
            return decided(
                False,
                f"champion v{champion.version} cannot be scored on this test data (other classes)",
            )
        report = decide_paired(
            PairedPredictions(theirs.labels, theirs.predicted, mine.predicted, table.classes),
            metric=metric,
            mode=registry.gate,  # type: ignore[arg-type]  # threshold never reaches here
            alpha=registry.alpha,
            margin=registry.margin,
            max_class_drop=registry.max_class_drop,
            seed=config.seed,
        )
        champion_score = score_predictions(theirs.probabilities, theirs.labels, table.classes)
        return decided(
            report.promote,
            f"against champion v{champion.version}: {report.summary()}",
            champion_score=champion_score.metric(metric),
            report=report,
        )

    return decide


def threshold_decider(
    uri: str, challenger_score: float, table, config
) -> Callable[[ModelVersionRef | None], PromotionDecision]:
    """The threshold gate: the champion's score on this test split against the challenger's."""
    registry: RegistryConfig = config.registry
    metric = config.evaluation.primary_metric

    def decide(champion: ModelVersionRef | None) -> PromotionDecision:
        scored = None if champion is None else version_predictions(uri, champion, table, config)
        champion_score = (
            None
            if scored is None
            else score_predictions(scored.probabilities, scored.labels, table.classes).metric(
                metric
            )
        )
        return decide_promotion(
            metric,
            challenger_score,
            champion,
            champion_score,
            min_value=registry.min_value,
            min_improvement=registry.min_improvement,
        )

    return decide


@task(name="check-gate-power", cache_policy=NO_CACHE)
def check_gate_power(registry: RegistryConfig, table) -> None:
    """Before training: can the test split show a retrain as good as the champion to be within
    the margin? A warning with the test images (or margin) that would, where it mostly cannot.

    Returns nothing: Prefect links a task's result to every later task input holding one of its
    parts, and a result carrying the config's own alpha and margin would link this task to all
    of them in the run graph.
    """
    if registry.gate != "non_inferiority":
        return
    power = non_inferiority_power(len(table.split("test")), registry.alpha, registry.margin)
    if not power.enough:
        run_logger().warning(power.warning())


# MLflow I/O can hit a busy tracking server or a locked SQLite file: retry 2, 4, 8 s later.
_BACKOFF = exponential_backoff(backoff_factor=2)


@task(
    name="register-challenger",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=_BACKOFF,
    retry_condition_fn=retry_if_store_locked,
)
def register_challenger_step(
    run: RunRef,
    record: StageRecord,
    table,
    loaded: LoadedConfig,
    data_version: str,
    notes: dict[str, str] | None = None,
) -> ModelVersionRef:
    """Register the final stage's model, packaged for serving (tasks/registry/serving.py) on the stage's
    run, recording what it was trained on (and `notes`)."""

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
        **(notes or {}),
    }
    stage_note = (
        MlflowClient(run.tracking_uri).get_run(record.run_id).data.tags.get(MLFLOW_RUN_NOTE, "")
    )
    description = (
        f"{config.base.architecture} at {config.data.image_size} px, {len(table.classes)} classes, "
        f"data version {data_version[:12]}: the model of the {record.stage} stage (run "
        f"{record.run_id}) of pipeline run {run.run_id}. {stage_note}"
    ).strip()
    example = Path(table.split("test")["path"].iloc[0])
    serving_uri = log_serving_model(
        run.tracking_uri, record.run_id, record.model_uri, table.classes, example
    )
    return register_challenger(
        run.tracking_uri,
        serving_uri,
        config.registry.model_name,
        run.run_id,
        tags,
        description=description,
    )


@task(name="promote-if-better", cache_policy=NO_CACHE)
def promote_if_better(
    run: RunRef, challenger: ModelVersionRef, evaluation: Evaluation, table, loaded: LoadedConfig
) -> PromotionDecision:
    """Check the challenger loads from the registry, apply the gate, promote if it passed;
    the decision goes to the run's log as the command prints it."""

    config = loaded.config
    metric = config.evaluation.primary_metric
    score = evaluation.metric(metric)
    uri = tracking_uri(loaded.project)
    problem = load_problem(uri, challenger, table, config)
    if problem is None:
        keep_scored_predictions(uri, challenger, table, evaluation)
    if problem is not None:
        decision = PromotionDecision(False, problem, metric, score)
        record_decision(uri, challenger, run.run_id, decision)
    else:
        if config.registry.gate == "threshold":
            decide = threshold_decider(uri, score, table, config)
        else:
            decide = paired_decider(uri, challenger, score, table, config)
        decision = promote_through_gate(uri, challenger, run.run_id, metric, score, decide)
    log_promotion(challenger, decision)
    return decision


def log_promotion(challenger: ModelVersionRef, decision: PromotionDecision) -> None:
    logger = run_logger()
    logger.info(
        "Registered: %s", registration_line(challenger.name, challenger.version, decision.promote)
    )
    logger.info("Decision: %s", decision.reason)
