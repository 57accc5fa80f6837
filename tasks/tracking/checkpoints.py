"""Durable stage checkpoints in MLflow: a finished stage's variables and results, found by lineage.

Every stage run that trains keeps, beside its model, a `checkpoint/` artifact (every variable of
the classifier, dropout's random state included, and the stage's history and test scores) and the
tag `lineage_key`. The key hashes everything that decides the stage's outcome, so any process
that reaches the tracking server (a rerun after a crash, a comparison worker, another machine)
can start from a stage that has already finished instead of training it again.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient

from tasks.inference.evaluate import Evaluation
from tasks.tracking.history import TrainingHistory

# Bump when training code changes what a stage with the same settings produces.
LINEAGE_VERSION = 1
LINEAGE_TAG = "lineage_key"
CHECKPOINT_TAG = "checkpoint"
RESUMED_TAG = "resumed_from_run_id"
MODEL_URI_TAG = "model_uri"
CHECKPOINT_DIR = "checkpoint"
_VARIABLES = "variables.npz"
_RESULT = "stage.json"


@dataclass(frozen=True)
class StageCheckpoint:
    """A stage that finished in some run: where it is, and what training it gave."""

    stage: str
    run_id: str
    model_uri: str | None
    history: TrainingHistory
    evaluation: Evaluation


def lineage_key(parent: str, part: dict[str, Any]) -> str:
    """The key of a stage: its parent's key (or the trunk's) chained with its own settings."""
    content = json.dumps({"parent": parent, "part": part}, sort_keys=True, default=str)
    return hashlib.sha256(content.encode()).hexdigest()


def write_checkpoint(
    client: MlflowClient, run_id: str, model, history: TrainingHistory, evaluation: Evaluation
) -> None:
    """Store `model`'s variables and the stage's results under the run's `checkpoint/`."""
    variables = list(model.variables)
    with tempfile.TemporaryDirectory(prefix="checkpoint-") as folder:
        np.savez(Path(folder) / _VARIABLES, *[np.asarray(v.numpy()) for v in variables])
        result = {
            "history": asdict(history),
            "evaluation": _evaluation_json(evaluation),
            "variables": [v.path for v in variables],
        }
        (Path(folder) / _RESULT).write_text(json.dumps(result))
        client.log_artifacts(run_id, folder, CHECKPOINT_DIR)


def find_checkpoint(uri: str, experiment_id: str, key: str) -> str | None:
    """The newest finished run in the experiment that trained a stage with this lineage key."""
    runs = MlflowClient(uri).search_runs(
        [experiment_id],
        f"tags.{LINEAGE_TAG} = '{key}' and tags.{CHECKPOINT_TAG} = 'saved' "
        "and attributes.status = 'FINISHED'",
        max_results=1,
        order_by=["attributes.end_time DESC"],
    )
    return runs[0].info.run_id if runs else None


def read_checkpoint(uri: str, run_id: str) -> StageCheckpoint:
    """A checkpointed stage's history and test scores (its variables stay on the server)."""
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory(prefix="checkpoint-") as folder:
        local = client.download_artifacts(run_id, f"{CHECKPOINT_DIR}/{_RESULT}", folder)
        result = json.loads(Path(local).read_text())
    history = result["history"]
    history["epochs"] = {name: tuple(values) for name, values in history["epochs"].items()}
    return StageCheckpoint(
        stage=run.data.tags.get("stage", run.info.run_name or ""),
        run_id=run_id,
        model_uri=run.data.tags.get(MODEL_URI_TAG),
        history=TrainingHistory(**history),
        evaluation=_evaluation_from(result["evaluation"]),
    )


def restore_checkpoint(uri: str, run_id: str, model) -> None:
    """Put `model` where the checkpointed stage ended: every weight and dropout's random state.

    Without the random state the next stage would draw other dropout masks than a run that
    trained the earlier stages itself, and end slightly elsewhere.
    """
    client = MlflowClient(uri)
    variables = list(model.variables)
    with tempfile.TemporaryDirectory(prefix="checkpoint-") as folder:
        local = client.download_artifacts(run_id, f"{CHECKPOINT_DIR}/{_VARIABLES}", folder)
        with np.load(local) as saved:
            if len(saved.files) != len(variables):
                raise CheckpointMismatchError(
                    f"the checkpoint of run {run_id} holds {len(saved.files)} variables, the "
                    f"classifier has {len(variables)}"
                )
            values = [saved[f"arr_{index}"] for index in range(len(variables))]
    for variable, value in zip(variables, values, strict=True):
        if tuple(variable.shape) != value.shape:
            raise CheckpointMismatchError(
                f"the checkpoint of run {run_id} has shape {value.shape} for {variable.path}, "
                f"the classifier {tuple(variable.shape)}"
            )
        variable.assign(value)


class CheckpointMismatchError(RuntimeError):
    """A checkpoint found by lineage does not fit the classifier built for it."""


def _evaluation_json(evaluation: Evaluation) -> dict[str, Any]:
    scores = asdict(replace(evaluation, probabilities=None))
    del scores["probabilities"]  # the scores only: a checkpoint's stage.json stays small
    return {**scores, "confusion": evaluation.confusion.tolist()}


def _evaluation_from(saved: dict[str, Any]) -> Evaluation:
    return Evaluation(
        classes=tuple(saved["classes"]),
        accuracy=saved["accuracy"],
        macro_f1=saved["macro_f1"],
        loss=saved["loss"],
        precision=tuple(saved["precision"]),
        recall=tuple(saved["recall"]),
        confusion=np.asarray(saved["confusion"], dtype=np.int64),
    )
