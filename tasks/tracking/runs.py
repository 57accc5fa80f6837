"""MLflow runs: a parent run per pipeline run and the runs nested in it, opened and closed."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

from tasks.model.compute import DEVICE_TAG
from tasks.runtime.stopping import signal_exit_status, stop_requested
from tasks.runtime.tracking_server import TRAINING_VIEW, check_tracking_server
from tasks.tracking.liveness import close_stale_runs, heartbeat, liveness_tags

# MLflow caps a param value at 6000 characters; ours are far shorter, but be safe.
_PARAM_LIMIT = 6000
# Who started a run, from what and on which device: the nested runs a pipeline opens carry its
# parent's (a resumed stage's run: the device of the run resuming it, not of the one that trained it).
_SOURCE_TAGS = (MLFLOW_USER, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_GIT_COMMIT, DEVICE_TAG)
# The dataset contexts of a stage run's inputs, by the image table's split names.
SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


@dataclass(frozen=True)
class RunRef:
    """An MLflow run, named explicitly because MLflow's active run is per thread."""

    run_id: str
    experiment_id: str
    tracking_uri: str

    def ui_path(self) -> str:
        return f"#/experiments/{self.experiment_id}/runs/{self.run_id}?{TRAINING_VIEW}"


@dataclass(frozen=True)
class StageRecord:
    """What a stage left in MLflow: its run and its loadable model."""

    stage: str
    run_id: str
    model_uri: str | None


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
    log_params(client, run_id, params)
    source = from_pandas(
        dataset,
        source=dataset_source,
        name=dataset_name or Path(dataset_source).name,
        digest=data_version[:36],
    )
    client.log_inputs(run_id, datasets=[dataset_input(source._to_mlflow_entity(), "training")])
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
        SPLIT_CONTEXTS[split]: Dataset(
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
            "path": relative_paths([path for path, _ in skipped], project),
            "problem": [problem for _, problem in skipped],
        }
    )
    client = MlflowClient(run.tracking_uri)
    client.log_text(run.run_id, listing.to_csv(index=False), SKIPPED_IMAGES_ARTIFACT)
    client.set_tag(run.run_id, "skipped_images", str(len(skipped)))


def relative_paths(paths, root: Path) -> list[str]:
    """Each path relative to the project root when it lies under it, else as it is.

    A string prefix against the root resolved once: resolving it per path took 0.8 s for the
    demo's 11,500 images, in every run the pipeline or a comparison cell opened.
    """
    prefix = f"{root.resolve()}{os.sep}"
    return [path[len(prefix) :] if path.startswith(prefix) else path for path in paths]


def dataset_input(dataset: Dataset, context: str) -> DatasetInput:
    """`dataset` as a run's input in `context` (training, validation or test)."""
    return DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    """Log `params` on the run in batches MLflow accepts."""
    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), 100):  # MLflow's batch limit for params
        client.log_batch(run_id, params=items[start : start + 100])


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
