"""One cell in this process: its images and classifier set up, its stages trained under its own run."""

from __future__ import annotations

import os
import resource
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import replace

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.comparison.cells import CellSpec
from tasks.comparison.records import log_strategy_summary
from tasks.comparison.strategies import (
    Strategy,
    keep_labels_per_class,
    labelled_subset_name,
    resolve_strategies,
    stages_on_same_base,
)
from tasks.data.table import load_image_table
from tasks.model.classifier import build_classifier_for
from tasks.runtime.prefect_server import after_lost_prefect_call
from tasks.runtime.stopping import stop_requested
from tasks.stages.base import StageInputs
from tasks.stages.feature_extraction import HeadOnFeatures
from tasks.stages.preflight import load_and_check
from tasks.stages.runner import run_stages
from tasks.tracking.runs import close_run_after_failure
from tasks.tracking.steps import finish_tracking, start_tracking


def strategy_named(strategies: Sequence[Strategy], name: str) -> Strategy:
    for strategy in strategies:
        if strategy.name == name:
            return strategy
    raise KeyError(f"the config declares no strategy {name!r}")


def set_up_cell(cell: CellSpec) -> tuple[Strategy, StageInputs]:
    """A cell's strategy (with the cell's seed) and its stages' inputs: its labelled images, a
    fresh classifier, and the feature pool and shared stages every cell of the comparison uses.

    Reads the image table from the project as the comparison did (the comparison has already
    pulled the data and checked every image).
    """
    loaded = load_and_check(cell.config_path, cell.overrides)
    strategies = resolve_strategies(loaded)
    strategy = strategy_named(strategies, cell.strategy).with_seed(cell.seed)
    config = strategy.loaded.config
    table = load_image_table(
        loaded.path(config.data.path),
        config.data.val_fraction,
        config.data.test_fraction,
        loaded.config.seed,  # the comparison's split, whatever the cell's seed
    )
    if cell.skipped_images:
        kept = ~table.frame["path"].isin(set(cell.skipped_images))
        table = replace(table, frame=table.frame[kept].reset_index(drop=True))
    checked = table  # the table the data gate checked, and computed the features of
    if cell.dropped_images:
        kept = ~table.frame["path"].isin(set(cell.dropped_images))
        table = replace(table, frame=table.frame[kept].reset_index(drop=True))
    labelled = keep_labels_per_class(table, cell.labels_per_class, config.seed)
    classifier = build_classifier_for(
        config.base,
        config.head,
        config.compute,
        config.data.image_size,
        config.seed,
        loaded.project,
        len(labelled.classes),
    )
    return strategy, StageInputs(
        classifier,
        labelled,
        strategy.loaded,
        cell.data_version,
        checked.split("train") if cell.pool_whole_split else feature_pool(cell, table),
        stages_on_same_base(strategies, strategy),
    )


def train_cell(cell: CellSpec) -> str:
    """Train one strategy at one budget with one seed under its own MLflow parent run; its id.

    Resumes the stages another cell or run finished.
    """
    strategy, inputs = set_up_cell(cell)
    config = strategy.loaded.config
    run = start_tracking(
        config,
        strategy.loaded.project,
        inputs.table,
        cell.data_version,
        strategy=strategy.name,
        run_name=f"{strategy.name}-{cell.labels_per_class}-per-class-seed-{cell.seed}",
        tags={
            "comparison_id": cell.comparison_id,
            "label_budget": str(cell.labels_per_class),
            "seed": str(cell.seed),
            "worker": f"{socket.gethostname()}:{os.getpid()}",
        },
        dataset_name=labelled_subset_name(config.data.path, cell.labels_per_class),
    )
    try:
        outcome = run_stages(run, strategy.stages, inputs, resume=config.tracking.resume)
        log_strategy_summary(run, cell.labels_per_class, outcome.summaries, peak_rss_mb())
    except BaseException as error:
        close_run_after_failure(run, error)
        raise
    finish_tracking(run, summaries=outcome.summaries, failed=False)
    return run.run_id


def feature_pool(cell: CellSpec, table) -> pd.DataFrame | None:
    """The training images any seed of the comparison draws at its largest budget, in table order.

    A smaller budget's images are a subset of the same seed's larger one, so this pool holds
    every training image of every cell.
    """
    if cell.pool_budget is None or not cell.pool_seeds:
        return None
    drawn: set[str] = set()
    for seed in cell.pool_seeds:
        drawn |= set(keep_labels_per_class(table, cell.pool_budget, seed).split("train")["path"])
    train = table.split("train")
    return train[train["path"].isin(drawn)].reset_index(drop=True)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux and macOS report it differently)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def release_models() -> None:
    """Drop Keras' global state and collect, so a worker that runs many cells does not grow.

    `free_memory=True` runs Python's collector; a second collection found nothing."""
    import keras

    keras.backend.clear_session(free_memory=True)


def refuse_if_stopping() -> None:
    """In a worker that SIGTERM reached: stop before the cell opens any run (the pool hands it
    the next queued cell as soon as the one in flight stops, and that cell's run would never
    close)."""
    # A function, not the flag itself, in the task: Prefect pickles the task's code with its
    # globals by value, and would copy the flag (or fail to pickle its lock).
    if stop_requested():
        raise SystemExit(128 + signal.SIGTERM)


# --- Prefect steps -------------------------------------------------------------------------------


@task(
    name="train-cell",
    task_run_name="train-cell[{cell.id}]",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=after_lost_prefect_call,
)
def train_cell_step(cell: CellSpec) -> str:
    """One cell in this worker process; the worker's Keras state is dropped after it.

    A cell that failed on a Prefect API call its server did not answer runs once more, from the
    stages it finished. Its task runs carry no tags: Prefect asks its server for a concurrency
    slot before every tagged task run, and cannot retry that request once it is refused.
    """
    refuse_if_stopping()
    try:
        return train_cell(cell)
    finally:
        release_models()


@task(name="cache-shared-features", cache_policy=NO_CACHE)
def cache_shared_features(cell: CellSpec) -> None:
    """The frozen features and cut activations that every cell reads, cached in this process
    for `cell` (the first transfer cell) before any cell trains.

    Called by the flow while its worker processes start: the pass then runs on every core, and
    no cell waits for another to cache them.
    """
    strategy, inputs = set_up_cell(cell)
    first = strategy.stages[0]
    if isinstance(first, HeadOnFeatures) and first.settings.cache_dir:
        first.features(inputs)
    release_models()
