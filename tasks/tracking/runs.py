"""MLflow tracking: one parent run per pipeline run, one nested run per stage."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunTag
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NOTE,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from conf.errors import ExpectedError, error_chain
from tasks.inference.evaluate import Evaluation, confusion_matrix_figure
from tasks.model.compute import DEVICE_TAG, device_description
from tasks.runtime.credentials import redact_url
from tasks.runtime.timeouts import retry_if_store_locked
from tasks.runtime.tracking_server import (
    TrackingServerUnreachableError,
    check_tracking_server,
    tracking_uri,
)
from tasks.tracking.checkpoints import (
    CHECKPOINT_TAG,
    LINEAGE_TAG,
    MODEL_URI_TAG,
    RESUMED_TAG,
    StageCheckpoint,
    write_checkpoint,
)
from tasks.tracking.history import StageResult, TrainingHistory
from tasks.tracking.liveness import HEARTBEAT_TAG, close_stale_runs, heartbeat, liveness_tags

# MLflow caps a param value at 6000 characters; ours are far shorter, but be safe.
_PARAM_LIMIT = 6000
# MLflow 3's UI opens an experiment in its GenAI view unless the link asks for the training one.
_TRAINING_VIEW = "workflowType=machine_learning"
# Who started a run, from what and on which device: the nested runs a pipeline opens carry its
# parent's (a resumed stage's run: the device of the run resuming it, not of the one that trained it).
_SOURCE_TAGS = (MLFLOW_USER, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_GIT_COMMIT, DEVICE_TAG)
# The dataset contexts of a stage run's inputs, by the image table's split names.
_SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


@dataclass(frozen=True)
class RunRef:
    """An MLflow run, named explicitly because MLflow's active run is per thread."""

    run_id: str
    experiment_id: str
    tracking_uri: str

    def ui_path(self) -> str:
        return f"#/experiments/{self.experiment_id}/runs/{self.run_id}?{_TRAINING_VIEW}"


@dataclass(frozen=True)
class StageRecord:
    """What a stage left in MLflow: its run and its loadable model."""

    stage: str
    run_id: str
    model_uri: str | None


class TrackingServerLostError(ExpectedError, RuntimeError):
    """The tracking server stopped answering in the middle of a run."""


def tracking_server_lost(
    error: BaseException, uri: str | None = None
) -> TrackingServerLostError | None:
    """`error` told as TrackingServerLostError when it came from a tracking server that no
    longer answers (MLflow's own message is its REST endpoint and urllib3's retry history)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")) or not _from_tracking_client(error):
        return None
    try:
        check_tracking_server(uri)
    except TrackingServerUnreachableError:
        return TrackingServerLostError(
            f"The MLflow tracking server {redact_url(uri)} (MLFLOW_TRACKING_URI) stopped answering during "
            "the run (each call gives up after timeouts.mlflow_seconds). Stages logged before it "
            "are checkpointed there: once it answers again, run the same command to resume "
            "from them."
        )
    return None


def _from_tracking_client(error: BaseException | None) -> bool:
    import requests
    from mlflow.exceptions import MlflowException

    return any(
        isinstance(link, MlflowException | requests.RequestException) for link in error_chain(error)
    )


def ui_hint(uri: str, project_root: Path, experiment_id: str | None = None) -> str:
    """How a user opens the MLflow UI on this tracking store: its URL, or the command to serve it.

    With `experiment_id`, the URL opens that experiment in the UI's training view (runs, charts,
    models); MLflow 3.17 would otherwise show its GenAI view (traces), empty here.
    """
    if uri.startswith(("http://", "https://")):
        server = redact_url(uri).rstrip("/")
        return (
            f"open {server}/{experiment_path(experiment_id)}" if experiment_id else f"open {server}"
        )
    artifacts = project_root.resolve() / "mlartifacts"
    command = (
        f"mlflow ui --backend-store-uri {redact_url(uri)} --default-artifact-root {artifacts} "
        "--host 127.0.0.1 --port 5000"
    )
    if experiment_id is None:
        return command
    return f"{command}, then open http://127.0.0.1:5000/{experiment_path(experiment_id)}"


def experiment_path(experiment_id: str) -> str:
    """The UI route of an experiment in its training view."""
    return f"#/experiments/{experiment_id}?{_TRAINING_VIEW}"


@contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at `uri` for one block, then put everything back.

    mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which would send every later run in
    this process (another project's, a test's) to this store.
    """
    from mlflow.tracking._tracking_service import utils

    saved_uri, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)  # type: ignore[arg-type]  # None unsets it
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def git_commit(project_root: Path) -> str:
    """The project's current commit, with `-dirty` when the work tree has changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=project_root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=project_root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def source_tags(project_root: Path) -> dict[str, str]:
    """The tags MLflow's fluent `start_run` sets (user, source name and type), and the project's
    commit when it is a git checkout.

    MLflow looks for the commit from the script that runs (the `transferflow` entry point in the
    virtual environment, pytest, a worker), which can sit in another checkout or in none: the
    commit here is always the project's.
    """
    from mlflow.tracking.context.git_context import GitRunContext
    from mlflow.tracking.context.registry import resolve_tags

    # MLflow annotates `ignore` as instances but matches it with isinstance: it takes classes.
    tags = resolve_tags(ignore=[GitRunContext])  # type: ignore[list-item]
    commit = git_commit(project_root)
    if commit != "unknown":
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1}, "c": [x, y]}` -> `{"a.b": "1", "c.0": "x", "c.1": "y"}`."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple) and value and isinstance(value[0], dict):
            for index, item in enumerate(value):
                flat.update(flatten(item, f"{name}.{index}."))
        else:
            flat[name] = str(value)[:_PARAM_LIMIT]
    return flat


def ensure_experiment(uri: str, name: str, project_root: Path) -> str:
    """The experiment's id, creating it with artifacts in the project folder for a local store."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (project_root.resolve() / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_pipeline_run(
    uri: str,
    experiment_id: str,
    *,
    run_name: str,
    params: dict[str, str],
    tags: dict[str, str],
    dataset: pd.DataFrame,
    dataset_source: str,
    data_version: str,
    heartbeat_seconds: float,
    description: str,
    dataset_name: str | None = None,
) -> RunRef:
    """Open the parent run: params, tags, a description (MLflow's run note), and the dataset as
    an input with the DVC hash as digest.

    Runs of the experiment whose owner died are closed as KILLED first; this one beats every
    `heartbeat_seconds` until it is closed. MLflow identifies a dataset by name and digest: a
    subset of the data version needs a name of its own, or its runs show the whole version's
    dataset.
    """
    client = MlflowClient(uri)
    close_stale_runs(uri, experiment_id, heartbeat_seconds)
    run = client.create_run(
        experiment_id,
        run_name=run_name,
        tags={**tags, MLFLOW_RUN_NOTE: description, **liveness_tags()},
    )
    run_id = run.info.run_id
    heartbeat.watch(run_id, uri, heartbeat_seconds)
    _log_params(client, run_id, params)
    source = from_pandas(
        dataset,
        source=dataset_source,
        name=dataset_name or Path(dataset_source).name,
        digest=data_version[:36],
    )
    client.log_inputs(run_id, datasets=[_dataset_input(source._to_mlflow_entity(), "training")])
    return RunRef(run_id, experiment_id, uri)


def start_nested_run(
    parent: RunRef,
    parent_run: Run,
    *,
    run_name: str,
    description: str,
    tags: dict[str, str],
    start_time: int | None = None,
) -> RunRef:
    """Open a run nested in `parent` (`parent_run` is it as read from MLflow), with a description.

    It is shown as created by the same user from the same source and commit as its parent: a bare
    `create_run` leaves "Created by" and "Source" empty.
    """
    inherited = {
        key: parent_run.data.tags[key] for key in _SOURCE_TAGS if key in parent_run.data.tags
    }
    created = MlflowClient(parent.tracking_uri).create_run(
        parent.experiment_id,
        start_time=start_time,
        run_name=run_name,
        tags={
            **inherited,
            MLFLOW_PARENT_RUN_ID: parent.run_id,
            MLFLOW_RUN_NOTE: description,
            **tags,
        },
    )
    return RunRef(created.info.run_id, parent.experiment_id, parent.tracking_uri)


def split_datasets(parent_run: Run, splits: dict[str, pd.DataFrame]) -> dict[str, Dataset]:
    """The pipeline run's dataset cut by split, keyed by MLflow dataset context (training, ...).

    MLflow keeps one input per dataset and run, so each split is a dataset of its own, named
    `<pipeline dataset>/<split>`, with the pipeline dataset's source, schema and DVC digest and
    its own row count. Empty splits are left out.
    """
    given_inputs = parent_run.inputs.dataset_inputs if parent_run.inputs else []
    whole = next(
        (
            given.dataset
            for given in given_inputs
            if any(
                tag.key == MLFLOW_DATASET_CONTEXT and tag.value == "training" for tag in given.tags
            )
        ),
        None,
    )
    if whole is None:
        return {}
    return {
        _SPLIT_CONTEXTS[split]: Dataset(
            name=f"{whole.name}/{split}",
            digest=whole.digest,
            source_type=whole.source_type,
            source=whole.source,
            schema=whole.schema,
            # The profile mlflow.data.from_pandas gives a frame.
            profile=json.dumps({"num_rows": len(frame), "num_elements": int(frame.size)}),
        )
        for split, frame in splits.items()
        if not frame.empty
    }


SKIPPED_IMAGES_ARTIFACT = "skipped_images.csv"


def log_skipped_images(run: RunRef, skipped: Sequence[tuple[str, str]], project: Path) -> None:
    """List the image files a run left out (path,problem) as an artifact, their count as a tag.

    Paths are relative to the project, as in the run's dataset input. Nothing is logged when
    nothing was skipped.
    """
    if not skipped:
        return
    listing = pd.DataFrame(
        {
            "path": _relative_paths([path for path, _ in skipped], project),
            "problem": [problem for _, problem in skipped],
        }
    )
    client = MlflowClient(run.tracking_uri)
    client.log_text(run.run_id, listing.to_csv(index=False), SKIPPED_IMAGES_ARTIFACT)
    client.set_tag(run.run_id, "skipped_images", str(len(skipped)))


def _dataset_input(dataset: Dataset, context: str) -> DatasetInput:
    return DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])


def _log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), 100):  # MLflow's batch limit for params
        client.log_batch(run_id, params=items[start : start + 100])


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
    _log_params(client, run_id, stage_params)
    if datasets:
        inputs = [_dataset_input(dataset, context) for context, dataset in datasets.items()]
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


def log_summary(run: RunRef, metrics: dict[str, float], tags: dict[str, str]) -> None:
    """Headline metrics and tags on the parent run, for the experiment's table view."""
    client = MlflowClient(run.tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(
        run.run_id,
        metrics=[Metric(name, value, now, 0) for name, value in metrics.items()],
        tags=[RunTag(name, value) for name, value in tags.items()],
    )


def finish_run(run: RunRef, failed: bool = False) -> None:
    MlflowClient(run.tracking_uri).set_terminated(run.run_id, "FAILED" if failed else "FINISHED")
    heartbeat.forget(run.run_id)


# Set by the SIGTERM handlers of the CLI and of cell workers. Once a process is told to stop,
# the error that reaches an open run may be a consequence of the stop rather than the signal
# itself (a worker's pool torn down under it, TensorFlow turning the exit raised inside its
# input pipeline into an error of its own): the run was still killed, not failed.
_stop_requested = threading.Event()


def note_stop_requested() -> None:
    """Record that this process was told to stop: runs closed from now on are KILLED."""
    _stop_requested.set()


def stop_requested() -> bool:
    return _stop_requested.is_set()


def signal_exit_status(error: BaseException) -> int | None:
    """128 + the signal's number when `error` is how a signal stopped this process, or was
    raised while handling that; else None.

    Inside a flow, SIGTERM raises Prefect's TerminationSignal, and Prefect's own handling of it
    fails (ValueError: Task run is not set) when it lands while a task run is being created.
    Outside, this project's handlers raise SystemExit(128 + the signal's number).
    """
    from prefect.exceptions import TerminationSignal

    for link in error_chain(error):
        if isinstance(link, TerminationSignal):
            return 128 + link.signal
        if isinstance(link, KeyboardInterrupt):
            return 128 + 2
        if isinstance(link, SystemExit) and isinstance(link.code, int) and link.code > 128:
            return link.code
    return None


def close_run_after_failure(run: RunRef, error: BaseException) -> None:
    """Close `run` and the stage runs it has open: KILLED after a signal, FAILED after an error.

    Never raises, and waits for no lost server: the error that got here is the one to report.
    A run its server cannot take now stays RUNNING until the next run in its experiment finds
    its heartbeat stopped and closes it as KILLED.
    """
    killed = stop_requested() or signal_exit_status(error) is not None
    status = "KILLED" if killed else "FAILED"
    runs = [*heartbeat.children_of(run.run_id), run.run_id]
    for run_id in runs:
        heartbeat.forget(run_id)
    try:
        check_tracking_server(run.tracking_uri)
        client = MlflowClient(run.tracking_uri)
        for run_id in runs:
            client.set_terminated(run_id, status)
    except Exception as close_error:
        logging.getLogger(__name__).warning(
            "Could not close MLflow run %s as %s (%s); the next run in its experiment closes it "
            "as KILLED once its heartbeat has stopped.",
            run.run_id,
            status,
            close_error,
        )


# --- Prefect steps -------------------------------------------------------------------------------


# A local SQLite store can be locked by another writer for a moment: retry 2, 4, 8 s later.
_BACKOFF = exponential_backoff(backoff_factor=2)


def model_requirements() -> list[str]:
    """The pins a logged model needs; giving them saves MLflow ~12 s of requirement inference."""
    import keras
    import tensorflow as tf

    return [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]


@task(
    name="start-tracking",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=_BACKOFF,
    retry_condition_fn=retry_if_store_locked,
)
def start_tracking(
    loaded,
    table,
    data_version: str,
    strategy: str,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    dataset_name: str | None = None,
) -> RunRef:
    """Open the pipeline's parent run with the resolved config, git commit, data version and the
    device TensorFlow trains on, and the list of image files left out as undecodable, if any.

    `tags` add to the standard ones, e.g. a comparison's id and label budget; `dataset_name`
    names a subset of the data (default: the data file or folder's name).
    """
    config = loaded.config
    uri = tracking_uri(loaded.project)
    experiment_id = ensure_experiment(uri, config.tracking.experiment, loaded.project)
    tree = config.model_dump(mode="json", exclude={"demo"})
    dataset = table.frame.assign(path=_relative_paths(table.frame["path"], loaded.project))
    dataset_source = loaded.path(config.data.path)
    sizes = {split: len(table.split(split)) for split in _SPLIT_CONTEXTS}
    weights = config.base.weights or "random"
    description = (
        f"{config.base.architecture} ({weights} weights) image classifier, strategy "
        f"{strategy}: {len(table.classes)} classes at {config.data.image_size} px, seed "
        f"{config.seed}. Data: {dataset_name or dataset_source.name} at DVC version "
        f"{data_version[:12]}, {sizes['train']} training, {sizes['val']} validation and "
        f"{sizes['test']} test images. Each stage is a nested run with its curves, test scores "
        "and model."
    )
    run = start_pipeline_run(
        uri,
        experiment_id,
        run_name=run_name or f"{config.base.architecture}-{strategy}",
        params=flatten(tree),
        tags={
            **source_tags(loaded.project),
            "data_version": data_version,
            "strategy": strategy,
            "architecture": config.base.architecture,
            DEVICE_TAG: device_description(),
            **(tags or {}),
        },
        dataset=dataset,
        dataset_source=str(dataset_source),
        data_version=data_version,
        heartbeat_seconds=config.tracking.heartbeat_seconds,
        description=description,
        dataset_name=dataset_name,
    )
    log_skipped_images(run, table.skipped, loaded.project)
    return run


def _split_frames(table) -> dict[str, pd.DataFrame]:
    return {split: table.split(split) for split in _SPLIT_CONTEXTS}


def _relative_paths(paths, root: Path) -> list[str]:
    """Each path relative to the project root when it lies under it, else as it is.

    A string prefix against the root resolved once: resolving it per path took 0.8 s for the
    demo's 11,500 images, in every run the pipeline or a comparison cell opened.
    """
    prefix = f"{root.resolve()}{os.sep}"
    return [path[len(prefix) :] if path.startswith(prefix) else path for path in paths]


@task(
    name="log-stage",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=_BACKOFF,
    retry_condition_fn=retry_if_store_locked,
)
def log_stage_run(
    run: RunRef,
    stage: str,
    params: dict,
    result: StageResult,
    model,
    table,
    image_size: int,
    project: Path,
    lineage: str,
    *,
    description: str,
    first_step: int = 0,
) -> StageRecord:
    """Log a trained stage as a nested run: its model loadable as a pyfunc, and its checkpoint.

    `model` is the trained Keras classifier, `table` the images it trained and was tested on
    (one test image, at `image_size`, is the model's input example); if the tracking server is
    lost, the model is kept under `project`. `description` says what the stage trains; `first_step` is the number of epochs the stages
    before it ran.
    """
    from tasks.data.stream import image_dataset

    example_frame = table.split("test").head(1)
    example = next(iter(image_dataset(example_frame, table.classes, image_size, batch_size=1)))[
        0
    ].numpy()
    try:
        return log_stage(
            run,
            stage,
            params=flatten(params),
            history=result.history,
            evaluation=result.evaluation,
            description=stage_description(
                description, result.history, result.evaluation, first_step
            ),
            first_step=first_step,
            splits=_split_frames(table),
            model=model,
            signature_example=example,
            pip_requirements=model_requirements(),
            tags={LINEAGE_TAG: lineage},
            checkpoint=True,
        )
    except Exception as error:
        lost = tracking_server_lost(error, run.tracking_uri)
        if lost is None:
            raise
        kept = save_unlogged_model(model, project, run, stage)
        raise TrackingServerLostError(
            f"{lost} The {stage} stage trained but could not be logged: its model is saved at "
            f"{kept}."
        ) from error


def save_unlogged_model(model, project_root: Path, run: RunRef, stage: str) -> Path:
    """Keep a trained model the tracking server could not take, as a .keras file in the project."""
    folder = project_root / ".cache" / "unlogged-models"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run.run_id}-{stage}.keras"
    model.save(path)
    return path


@task(
    name="log-resumed-stage",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=_BACKOFF,
    retry_condition_fn=retry_if_store_locked,
)
def log_resumed_stage(
    run: RunRef,
    stage: str,
    params: dict,
    checkpoint: StageCheckpoint,
    table,
    lineage: str,
    *,
    description: str,
    first_step: int = 0,
) -> StageRecord:
    """Record a stage resumed from a checkpoint; its model stays on the run that trained it.

    The nested run has the stage's params, curves (from `first_step`, as if trained here),
    scores and datasets like any other, and the tag `resumed_from_run_id` names the run that
    trained it.
    """
    record = log_stage(
        run,
        stage,
        params=flatten(params),
        history=checkpoint.history,
        evaluation=checkpoint.evaluation,
        description=stage_description(
            description,
            checkpoint.history,
            checkpoint.evaluation,
            first_step,
            resumed_from=checkpoint.run_id,
        ),
        first_step=first_step,
        splits=_split_frames(table),
        tags={RESUMED_TAG: checkpoint.run_id, LINEAGE_TAG: lineage},
    )
    return StageRecord(stage, record.run_id, checkpoint.model_uri)


@task(
    name="finish-tracking",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=_BACKOFF,
    retry_condition_fn=retry_if_store_locked,
)
def finish_tracking(run: RunRef, summaries, failed: bool) -> None:
    """Close the parent run, with the final stage's scores as its headline metrics."""
    if summaries:
        final = summaries[-1]
        log_summary(
            run,
            {"test_accuracy": final.test_accuracy, "test_macro_f1": final.test_macro_f1},
            {"final_stage": final.stage},
        )
    finish_run(run, failed=failed)
