"""Run a list of stages: start from the longest run of them already checkpointed, train the rest.

Each stage's lineage key chains the data, base, head and seed with the settings of every stage
up to it, so a stage is resumed only when training it again would give the same result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from tasks.inference.evaluate import Evaluation
from tasks.inference.features import weights_fingerprint
from tasks.runtime.run_log import resumed_line, run_logger
from tasks.runtime.run_names import for_stage
from tasks.runtime.timeouts import retry_if_store_locked
from tasks.stages.base import Stage, StageInputs
from tasks.tracking.checkpoints import (
    LINEAGE_VERSION,
    StageCheckpoint,
    find_checkpoint,
    lineage_key,
    read_checkpoint,
    restore_checkpoint,
)
from tasks.tracking.history import StageSummary, TrainingHistory
from tasks.tracking.runs import RunRef, StageRecord
from tasks.tracking.steps import log_resumed_stage, log_stage_run

# MLflow I/O can hit a busy tracking server or a locked SQLite file: retry 2, 4, 8 s later.
_BACKOFF = exponential_backoff(backoff_factor=2)


@dataclass(frozen=True)
class StagesOutcome:
    """Every stage's MLflow record, scores and per-epoch history, the final evaluation, and what
    was resumed."""

    records: list[StageRecord]
    summaries: list[StageSummary]
    evaluation: Evaluation
    resumed: list[StageCheckpoint]
    histories: list[TrainingHistory]


def run_stages(
    run: RunRef, stages: Sequence[Stage], inputs: StageInputs, resume: bool = True
) -> StagesOutcome:
    """Resume the stages already checkpointed (in order, from the first), then train the rest.

    Each trained stage is logged as a nested run of `run` with its model and checkpoint; each
    resumed one as a nested run tagged `resumed_from_run_id`, whose model stays on that run.
    A stage's epochs continue the step count of the stages before it, so one chart draws the
    whole training, resumed or not.
    """
    if not stages:
        raise ValueError("a pipeline needs at least one stage")
    keys = lineage_keys(stages, inputs)
    done = find_finished_stages(run, keys) if resume else []
    records: list[StageRecord] = []
    summaries: list[StageSummary] = []
    histories: list[TrainingHistory] = []
    evaluation = None
    if done:
        resume_classifier(run, done[-1], inputs.classifier)
        for stage, key, checkpoint in zip(stages, keys, done, strict=False):
            log_resumed = for_stage(log_resumed_stage, stage.name)
            records.append(
                log_resumed(
                    run,
                    stage.name,
                    stage.params(),
                    checkpoint,
                    inputs.table,
                    key,
                    description=stage.describe(),
                    first_step=_steps_so_far(summaries),
                )
            )
            summaries.append(StageSummary.of(stage.name, checkpoint.history, checkpoint.evaluation))
            histories.append(checkpoint.history)
            log_stage_scores(summaries[-1], resumed_from=checkpoint.run_id)
        evaluation = done[-1].evaluation
    for stage, key in zip(stages[len(done) :], keys[len(done) :], strict=True):
        result = stage.train(replace(inputs, after=tuple(records[-1:])))
        log_trained = for_stage(log_stage_run, stage.name)
        records.append(
            log_trained(
                run,
                stage.name,
                stage.params(),
                result,
                inputs.classifier.model,
                inputs.table,
                inputs.loaded.config.data.image_size,
                inputs.unlogged_models_dir,
                key,
                description=stage.describe(),
                first_step=_steps_so_far(summaries),
            )
        )
        summaries.append(StageSummary.of(stage.name, result.history, result.evaluation))
        histories.append(result.history)
        log_stage_scores(summaries[-1])
        evaluation = result.evaluation
    assert evaluation is not None
    return StagesOutcome(records, summaries, evaluation, done, histories)


def _steps_so_far(summaries: Sequence[StageSummary]) -> int:
    return sum(summary.epochs_run for summary in summaries)


def lineage_keys(stages: Sequence[Stage], inputs: StageInputs) -> list[str]:
    """Each stage's key: the trunk's, chained through every stage up to and including it."""
    key = lineage_key("", trunk_lineage(inputs))
    keys = []
    for stage in stages:
        key = lineage_key(key, stage.lineage())
        keys.append(key)
    return keys


def trunk_lineage(inputs: StageInputs) -> dict[str, Any]:
    """What every stage's outcome depends on: data and split, base and its weights, head, seed,
    and how TensorFlow computes (compute.precision, and compute.jit_compile: XLA draws other
    dropout masks).

    Image paths count relative to the project, so a clone elsewhere finds the same stages.
    """
    config = inputs.loaded.config
    return {
        "lineage_version": LINEAGE_VERSION,
        "data_version": inputs.data_version,
        "images": table_digest(inputs.table, inputs.loaded.project),
        "architecture": config.base.architecture,
        "options": config.base.options,
        "weights_sha256": weights_fingerprint(inputs.classifier.base),
        "image_size": config.data.image_size,
        "batch_size": config.data.batch_size,
        "head": config.head.model_dump(mode="json"),
        "seed": config.seed,
        **config.compute.non_default(),
    }


def table_digest(table, project: Path) -> str:
    """sha256 of the table's rows (path relative to the project, label, split) in order."""
    root = project.resolve()
    digest = hashlib.sha256(json.dumps(list(table.classes)).encode())
    for path, label, split in table.frame[["path", "label", "split"]].itertuples(index=False):
        try:
            shown = str(Path(path).relative_to(root))
        except ValueError:
            shown = str(path)
        digest.update(f"{shown}\0{label}\0{split}\n".encode())
    return digest.hexdigest()


# --- Prefect steps -------------------------------------------------------------------------------


@task(
    name="find-finished-stages",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=_BACKOFF,
    retry_condition_fn=retry_if_store_locked,
)
def find_finished_stages(run: RunRef, keys: list[str]) -> list[StageCheckpoint]:
    """The longest run of stages, from the first, that some run has already finished."""
    found = []
    for key in keys:
        run_id = find_checkpoint(run.tracking_uri, run.experiment_id, key)
        if run_id is None:
            break
        found.append(read_checkpoint(run.tracking_uri, run_id))
    return found


@task(
    name="resume-classifier",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=_BACKOFF,
    retry_condition_fn=retry_if_store_locked,
)
def resume_classifier(run: RunRef, checkpoint: StageCheckpoint, classifier) -> None:
    """Load the last finished stage's variables into the freshly built classifier."""
    restore_checkpoint(run.tracking_uri, checkpoint.run_id, classifier.model)


def log_stage_scores(summary: StageSummary, resumed_from: str | None = None) -> None:
    logger = run_logger()
    if resumed_from is not None:
        logger.info("Resumed: %s", resumed_line(summary.stage, resumed_from))
    logger.info("Test scores: %s", summary.line())
