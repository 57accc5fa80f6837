"""What a stage's nested run holds: params, curves, test scores, per-class tables and its model."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Dataset, Metric
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from tasks.inference.evaluate import Evaluation, confusion_matrix_figure
from tasks.runtime.tracking_server import using_tracking_uri
from tasks.tracking.checkpoints import CHECKPOINT_TAG, MODEL_URI_TAG, write_checkpoint
from tasks.tracking.history import TrainingHistory
from tasks.tracking.liveness import HEARTBEAT_TAG, heartbeat
from tasks.tracking.runs import (
    RunRef,
    StageRecord,
    close_run_after_failure,
    dataset_input,
    log_params,
    split_datasets,
    start_nested_run,
)


def log_stage(
    parent: RunRef,
    stage: str,
    *,
    params: dict[str, str],
    history: TrainingHistory,
    evaluation: Evaluation,
    description: str,
    first_step: int = 0,
    splits: dict[str, pd.DataFrame] | None = None,
    model=None,
    signature_example: np.ndarray | None = None,
    pip_requirements: list[str] | None = None,
    tags: dict[str, str] | None = None,
    checkpoint: bool = False,
) -> StageRecord:
    """Record one finished stage as a nested run: params, per-epoch curves, test scores, model.

    Epoch `i` is logged at step `first_step + i`, so the stages of one pipeline draw one curve.
    `splits` (the image table's train, val and test rows) become the run's dataset inputs, cut
    from the pipeline run's dataset. The model is logged under the stage's name and carries the
    metrics of the epoch whose weights it holds and the test scores. With `checkpoint`, the
    model's variables and the stage's results are stored too and the run is tagged
    `checkpoint=saved` before it is closed, so a later run can start from it.
    """
    client = MlflowClient(parent.tracking_uri)
    parent_run = client.get_run(parent.run_id)
    started_ms = int((time.time() - history.seconds) * 1000)
    run = start_nested_run(
        parent,
        parent_run,
        run_name=stage,
        description=description,
        tags={"stage": stage, HEARTBEAT_TAG: str(int(time.time())), **(tags or {})},
        start_time=started_ms,
    )
    run_id = run.run_id
    heartbeat.watch(run_id, parent.tracking_uri, parent=parent.run_id)
    try:
        model_uri = _log_stage_contents(
            client,
            parent.tracking_uri,
            run_id,
            stage,
            params=params,
            history=history,
            evaluation=evaluation,
            description=description,
            first_step=first_step,
            datasets=split_datasets(parent_run, splits or {}),
            model=model,
            signature_example=signature_example,
            pip_requirements=pip_requirements,
            checkpoint=checkpoint,
        )
    except BaseException as error:
        close_run_after_failure(RunRef(run_id, parent.experiment_id, parent.tracking_uri), error)
        raise
    client.set_terminated(run_id, "FINISHED")
    heartbeat.forget(run_id)
    return StageRecord(stage, run_id, model_uri)


def _log_stage_contents(
    client: MlflowClient,
    uri: str,
    run_id: str,
    stage: str,
    *,
    params: dict[str, str],
    history: TrainingHistory,
    evaluation: Evaluation,
    description: str,
    first_step: int,
    datasets: dict[str, Dataset],
    model,
    signature_example: np.ndarray | None,
    pip_requirements: list[str] | None,
    checkpoint: bool,
) -> str | None:
    stage_params = {
        **params,
        "learning_rate": str(history.learning_rate),
        "trainable_params": str(history.trainable_params),
    }
    log_params(client, run_id, stage_params)
    if datasets:
        inputs = [dataset_input(dataset, context) for context, dataset in datasets.items()]
        client.log_inputs(run_id, datasets=inputs)
    model_uri = model_id = None
    if model is not None:
        # Before the metrics: MLflow would link the metrics already at `step` to the model.
        model_uri = _log_model(
            uri,
            run_id,
            model,
            signature_example,
            pip_requirements,
            name=stage,
            step=first_step + history.best_epoch,
        )
        model_id = _logged_model_id(model_uri)
        client.set_logged_model_tags(model_id, {MLFLOW_RUN_NOTE: description})
    metrics = stage_metrics(history, evaluation, first_step, model_id, datasets)
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit for metrics
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    figure = confusion_matrix_figure(evaluation, title=stage)
    client.log_figure(run_id, figure, "confusion_matrix.png")
    client.log_dict(run_id, _per_class(evaluation), "per_class.json")
    client.log_table(run_id, evaluation.per_class_table(), PER_CLASS_TABLE)
    if model_uri is not None:
        client.set_tag(run_id, MODEL_URI_TAG, model_uri)
        if checkpoint:
            write_checkpoint(client, run_id, model, history, evaluation)
            client.set_tag(run_id, CHECKPOINT_TAG, "saved")
    return model_uri


PER_CLASS_TABLE = "per_class_scores.json"


def stage_metrics(
    history: TrainingHistory,
    evaluation: Evaluation,
    first_step: int,
    model_id: str | None,
    datasets: dict[str, Dataset],
) -> list[Metric]:
    """A stage's curves at steps `first_step`, ..., its test scores and totals at its last step.

    With `model_id`, the points that describe the logged model are linked to it, each with the
    split it was measured on: the kept epoch's (early stopping restores the weights of the epoch
    with the lowest validation loss) and the test scores.
    """
    now = int(time.time() * 1000)
    kept = first_step + history.best_epoch
    last = first_step + history.epochs_run - 1

    def metric(name: str, value: float, step: int, context: str | None) -> Metric:
        if model_id is None:
            return Metric(name, value, now, step)
        dataset = datasets.get(context) if context else None
        return Metric(
            name,
            value,
            now,
            step,
            model_id=model_id,
            dataset_name=dataset.name if dataset else None,
            dataset_digest=dataset.digest if dataset else None,
        )

    metrics = []
    for name, values in history.epochs.items():
        context = "validation" if name.startswith("val_") else "training"
        for epoch, value in enumerate(values):
            step = first_step + epoch
            if step == kept:
                metrics.append(metric(name, value, step, context))
            else:
                metrics.append(Metric(name, value, now, step))
    totals = {
        "epochs_run": float(history.epochs_run),
        "best_epoch": float(history.best_epoch),
        "train_seconds": history.seconds,
    }
    metrics += [metric(name, value, last, "test") for name, value in evaluation.metrics().items()]
    metrics += [metric(name, value, last, None) for name, value in totals.items()]
    return metrics


def _logged_model_id(model_uri: str) -> str:
    """The id of a model logged in MLflow 3, whose URI is `models:/<model id>`."""
    return model_uri.removeprefix("models:/")


def stage_description(
    what: str,
    history: TrainingHistory,
    evaluation: Evaluation,
    first_step: int,
    resumed_from: str | None = None,
) -> str:
    """A stage run's note: what it trains, how long, from which step, and its test scores."""
    last = first_step + history.epochs_run - 1
    text = (
        f"{what} {history.epochs_run} epochs (steps {first_step}-{last} of the pipeline's curves) "
        f"at learning rate {history.learning_rate:g}, {history.trainable_params:,} trainable "
        f"parameters; the model keeps epoch {history.best_epoch + 1} (step "
        f"{first_step + history.best_epoch}). Test accuracy {evaluation.accuracy:.4f}, macro-F1 "
        f"{evaluation.macro_f1:.4f}."
    )
    if resumed_from:
        text += f" Resumed from run {resumed_from}, not trained again: its model stays there."
    return text


def _per_class(evaluation: Evaluation) -> dict[str, Any]:
    return {
        "classes": list(evaluation.classes),
        "precision": list(evaluation.precision),
        "recall": list(evaluation.recall),
        "confusion": evaluation.confusion.tolist(),
    }


def _log_model(uri, run_id, model, signature_example, pip_requirements, *, name, step) -> str:
    """Log `model` with a signature inferred from one real input; no input example.

    Given an input example, MLflow checks it by loading the saved model back and predicting:
    2 s of the 2.3 s a stage's model log took here, which made tracking 10% of the flow. The
    signature (input shape and dtype, output shape) is what pyfunc and serving check against.
    """
    import mlflow.tensorflow
    from mlflow.models import infer_signature

    signature = None
    if signature_example is not None:
        outputs = np.asarray(model(signature_example, training=False))
        signature = infer_signature(signature_example, outputs)
    # The fluent API is the only way to log a model; resuming the run by id keeps it explicit.
    with using_tracking_uri(uri), mlflow.start_run(run_id=run_id):
        info = mlflow.tensorflow.log_model(
            model, name=name, signature=signature, pip_requirements=pip_requirements, step=step
        )
    return info.model_uri


def model_requirements() -> list[str]:
    """The pins a logged model needs; giving them saves MLflow ~12 s of requirement inference."""
    import keras
    import tensorflow as tf

    return [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]
