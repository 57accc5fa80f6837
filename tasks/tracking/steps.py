"""The Prefect tasks that track a pipeline: open its run, log each stage, close the run."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from conf.schema import PipelineConfig
from tasks.data.stream import image_dataset
from tasks.model.compute import DEVICE_TAG, device_description
from tasks.runtime.timeouts import retry_if_store_locked
from tasks.runtime.tracking_server import (
    TrackingServerLostError,
    tracking_server_lost,
    tracking_uri,
)
from tasks.tracking.checkpoints import LINEAGE_TAG, RESUMED_TAG, StageCheckpoint
from tasks.tracking.history import StageResult
from tasks.tracking.runs import (
    SPLIT_CONTEXTS,
    RunRef,
    StageRecord,
    ensure_experiment,
    finish_run,
    flatten,
    log_skipped_images,
    log_summary,
    relative_paths,
    source_tags,
    start_pipeline_run,
)
from tasks.tracking.stage_runs import log_stage, model_requirements, stage_description

# A local SQLite store can be locked by another writer for a moment: retry 2, 4, 8 s later.
_BACKOFF = exponential_backoff(backoff_factor=2)


@task(
    name="start-tracking",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=_BACKOFF,
    retry_condition_fn=retry_if_store_locked,
)
def start_tracking(
    config: PipelineConfig,
    project: Path,
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
    names a subset of the data (default: the data file or folder's name). The whole `config`
    becomes the run's params; `project` is the folder its paths are relative to.
    """
    uri = tracking_uri(project)
    experiment_id = ensure_experiment(uri, config.tracking.experiment, project)
    tree = config.model_dump(mode="json", exclude={"demo"})
    dataset = table.frame.assign(path=relative_paths(table.frame["path"], project))
    dataset_source = (project / config.data.path).resolve()
    sizes = {split: len(table.split(split)) for split in SPLIT_CONTEXTS}
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
            **source_tags(project),
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
    log_skipped_images(run, table.skipped, project)
    return run


def _split_frames(table) -> dict[str, pd.DataFrame]:
    return {split: table.split(split) for split in SPLIT_CONTEXTS}


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
    unlogged_dir: Path,
    lineage: str,
    *,
    description: str,
    first_step: int = 0,
) -> StageRecord:
    """Log a trained stage as a nested run: its model loadable as a pyfunc, and its checkpoint.

    `model` is the trained Keras classifier, `table` the images it trained and was tested on
    (one test image, at `image_size`, is the model's input example); if the tracking server is
    lost, the model is kept as a .keras file in `unlogged_dir`. `description` says what the
    stage trains; `first_step` is the number of epochs the stages before it ran.
    """
    example_frame = table.split("test").head(1)
    batch = next(iter(image_dataset(example_frame, table.classes, image_size, batch_size=1)))
    example = batch[0].numpy()
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
        kept = save_unlogged_model(model, unlogged_dir, run, stage)
        raise TrackingServerLostError(
            f"{lost} The {stage} stage trained but could not be logged: its model is saved at "
            f"{kept}."
        ) from error


def save_unlogged_model(model, folder: Path, run: RunRef, stage: str) -> Path:
    """Keep a trained model the tracking server could not take, as a .keras file in `folder`."""
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


@task(
    name="log-data-checks",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=_BACKOFF,
    retry_condition_fn=retry_if_store_locked,
)
def log_data_checks(run: RunRef, metrics: dict[str, float], decision: str, report: Path) -> None:
    """The data gate's record on the parent run: its `metrics` (`data_checks.<count>`,
    `domain_fit.*`), the report's files under `data_checks/`, and the decision as tag
    `data_checks`."""
    client = MlflowClient(run.tracking_uri)
    now = int(time.time() * 1000)
    logged = [Metric(name, float(value), now, 0) for name, value in metrics.items()]
    client.log_batch(run.run_id, metrics=logged, tags=[RunTag("data_checks", decision)])
    client.log_artifacts(run.run_id, str(report), "data_checks")
