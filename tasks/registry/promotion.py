"""Promotion: check the challenger loads, score it against the champion, move the alias if it passed.

Two gates, chosen by `registry.gate`:
- `non_inferiority` (the default) / `superiority`: both models predict the same test images and
  the paired difference decides, with a per-class recall check (tasks/registry/gate.py);
- `threshold`: the challenger's score must beat the champion's by `min_improvement`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from conf.registry import RegistryConfig
from conf.training import BaseModelConfig
from tasks.inference.evaluate import Evaluation, score_predictions
from tasks.registry.decision import (
    PromotionDecision,
    decide_promotion,
    promote_through_gate,
    record_decision,
)
from tasks.registry.gate import PairedPredictions, decide_paired
from tasks.registry.gate_power import non_inferiority_power
from tasks.registry.held_out import HeldOutPredictions, keep_scored_predictions, version_predictions
from tasks.registry.serving import log_serving_model
from tasks.registry.serving_model import IMAGE_COLUMN, LABEL_COLUMN, PROBABILITY_COLUMN
from tasks.registry.versions import (
    ModelVersionRef,
    load_pyfunc,
    register_challenger,
)
from tasks.runtime.run_log import registration_line, run_logger
from tasks.runtime.timeouts import retry_if_store_locked
from tasks.runtime.tracking_server import using_tracking_uri
from tasks.tracking.runs import RunRef, StageRecord


def load_problem(uri: str, version: ModelVersionRef, table) -> str | None:
    """Why the version cannot serve, or None: loaded as a pyfunc from the registry, it must
    answer a request of real test image files as `mlflow models serve` would: one row per image,
    with its label, probability and a column per class."""
    import pandas as pd

    paths = table.split("test").head(8)["path"]
    request = pd.DataFrame({IMAGE_COLUMN: [Path(path).read_bytes() for path in paths]})
    try:
        with using_tracking_uri(uri):
            answer = load_pyfunc(version.uri).predict(request)
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
    registry: RegistryConfig,
    metric: str,
    batch_size: int,
    seed: int,
) -> Callable[[ModelVersionRef | None], PromotionDecision]:
    """The paired gate against whichever champion is current when it is called.

    The challenger predicts the test set once, and only when there is a champion to compare it
    with: a first registration, or a challenger below min_value, scores nothing. `seed` draws
    the gate's bootstrap.
    """

    @functools.cache
    def challenger_predictions() -> HeldOutPredictions | None:
        return version_predictions(uri, challenger, table, batch_size)

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
        theirs = version_predictions(uri, champion, table, batch_size)
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
            seed=seed,
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
    uri: str,
    challenger_score: float,
    table,
    registry: RegistryConfig,
    metric: str,
    batch_size: int,
) -> Callable[[ModelVersionRef | None], PromotionDecision]:
    """The threshold gate: the champion's score on this test split against the challenger's."""

    def decide(champion: ModelVersionRef | None) -> PromotionDecision:
        scored = None if champion is None else version_predictions(uri, champion, table, batch_size)
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
    model_name: str,
    base: BaseModelConfig,
    image_size: int,
    config_sha256: str,
    data_version: str,
    notes: dict[str, str] | None = None,
) -> ModelVersionRef:
    """Register the final stage's model as a version of `model_name`, packaged for serving
    (tasks/registry/serving.py) on the stage's run, recording what it was trained on: data
    version, config fingerprint (`config_fingerprint`), base, image size, classes (and
    `notes`)."""
    if record.model_uri is None:
        raise ValueError(f"stage {record.stage} logged no model to register")
    tags = {
        "data_version": data_version,
        "config_sha256": config_sha256,
        "architecture": base.architecture,
        "image_size": str(image_size),
        "stage": record.stage,
        "classes": json.dumps(list(table.classes)),
        **(notes or {}),
    }
    stage_note = (
        MlflowClient(run.tracking_uri).get_run(record.run_id).data.tags.get(MLFLOW_RUN_NOTE, "")
    )
    description = (
        f"{base.architecture} at {image_size} px, {len(table.classes)} classes, "
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
        model_name,
        run.run_id,
        tags,
        description=description,
    )


@task(name="promote-if-better", cache_policy=NO_CACHE)
def promote_if_better(
    run: RunRef,
    challenger: ModelVersionRef,
    evaluation: Evaluation,
    table,
    registry: RegistryConfig,
    metric: str,
    batch_size: int,
    seed: int,
) -> PromotionDecision:
    """Check the challenger loads from the registry, apply the gate, promote if it passed;
    the decision goes to the run's log as the command prints it.

    The challenger is judged on `metric` (evaluation.primary_metric); the gate's models score
    the test images in batches of `batch_size`, and `seed` draws its bootstrap.
    """
    score = evaluation.metric(metric)
    uri = run.tracking_uri
    problem = load_problem(uri, challenger, table)
    if problem is None:
        keep_scored_predictions(uri, challenger, table, evaluation)
    if problem is not None:
        decision = PromotionDecision(False, problem, metric, score)
        record_decision(uri, challenger, run.run_id, decision)
    else:
        if registry.gate == "threshold":
            decide = threshold_decider(uri, score, table, registry, metric, batch_size)
        else:
            decide = paired_decider(
                uri, challenger, score, table, registry, metric, batch_size, seed
            )
        decision = promote_through_gate(uri, challenger, run.run_id, metric, score, decide)
    log_promotion(challenger, decision)
    return decision


def log_promotion(challenger: ModelVersionRef, decision: PromotionDecision) -> None:
    logger = run_logger()
    logger.info(
        "Registered: %s", registration_line(challenger.name, challenger.version, decision.promote)
    )
    logger.info("Decision: %s", decision.reason)
