"""Comparison cells: one strategy at one label budget with one seed, trained in a worker.

A cell is described by plain values (config file, overrides, strategy, budget, data version), so
a local worker process and a flow run on a Prefect work pool can both run it. A cell returns only
its MLflow run id; the comparison reads everything else back from MLflow, where every worker
writes, and cells share frozen features (the feature cache) and finished stages (checkpoints).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from mlflow import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict

from conf.compare import CompareConfig
from conf.errors import ExpectedError
from tasks.comparison.records import log_strategy_summary
from tasks.comparison.strategies import (
    ComparisonPlan,
    Strategy,
    keep_labels_per_class,
    labelled_subset_name,
    resolve_strategies,
    shared_prefix,
    stage_path,
    stages_on_same_base,
)
from tasks.comparison.table import StrategyOutcome
from tasks.runtime.prefect_server import after_lost_prefect_call
from tasks.runtime.stopping import note_stop_requested, stop_requested
from tasks.stages.preflight import load_and_check
from tasks.tracking.checkpoints import RESUMED_TAG, read_checkpoint
from tasks.tracking.history import StageSummary
from tasks.tracking.runs import RunRef, StageRecord, close_run_after_failure
from tasks.tracking.steps import finish_tracking, start_tracking

if TYPE_CHECKING:
    from tasks.stages.base import StageInputs

CELL_FLOW = "train-comparison-cell"


class DataVersionChangedError(ExpectedError, RuntimeError):
    """A worker found another data version than the comparison it works for."""


class CellSpec(BaseModel):
    """One strategy at one label budget with one seed, as plain values a worker anywhere can use.

    The seed draws the cell's labelled images and initialises and shuffles its training; the
    split stays on the config's `seed`, so every cell is tested on the same images. `after`
    lists the cells that must finish first: the one whose stages this cell begins with, or, on a
    work pool, for the first transfer cell of any other budget or seed, the very first one's (its
    features are cached by then; local workers find them cached by the flow before any cell).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    config_path: str
    overrides: tuple[str, ...] = ()
    strategy: str
    labels_per_class: int
    seed: int
    comparison_id: str
    data_version: str
    after: tuple[str, ...] = ()
    skipped_images: tuple[str, ...] = ()  # undecodable files the comparison left out
    # Every seed's images at the largest budget: the training images whose frozen features all
    # the comparison's cells share.
    pool_seeds: tuple[int, ...] = ()
    pool_budget: int | None = None

    @property
    def id(self) -> str:
        return cell_id(self.strategy, self.labels_per_class, self.seed)


def cell_id(strategy: str, labels_per_class: int, seed: int) -> str:
    return f"{strategy}@{labels_per_class}/seed={seed}"


@task(name="plan-cells", cache_policy=NO_CACHE)
def plan_cells(
    plan: ComparisonPlan,
    config_path: str,
    overrides: Sequence[str],
    data_version: str,
    skipped: Sequence[tuple[str, str]] = (),
    features_cached_first: bool = False,
) -> list[CellSpec]:
    """Every strategy at every budget with every seed, each after the cell it can resume from.

    Seeds come outermost, so the whole grid of the first seed finishes first. Unless the flow
    caches the shared features before any cell (`features_cached_first`), every transfer cell
    that resumes nothing waits for the first one, which caches them.

    The config file is named by its absolute path: workers on other machines need the project
    checked out at the same place. `skipped` are the undecodable files (and why) the comparison
    leaves out under `data.on_bad_images: skip`, so no worker decodes every image again.
    """
    config_path = str(Path(config_path).resolve())
    paths = {strategy.name: stage_path(strategy) for strategy in plan.strategies}
    first = first_transfer_cell(plan)
    cells = []
    for seed, budget in itertools.product(plan.seeds, plan.label_budgets):
        for index, strategy in enumerate(plan.strategies):
            after: list[str] = []
            longest = 0
            for earlier in plan.strategies[:index]:
                shared = shared_prefix(paths[strategy.name], paths[earlier.name])
                if shared > longest:
                    longest, after = shared, [cell_id(earlier.name, budget, seed)]
            here = cell_id(strategy.name, budget, seed)
            if not (after or strategy.from_scratch or features_cached_first or here == first):
                assert first is not None
                after = [first]
            cells.append(
                CellSpec(
                    config_path=config_path,
                    overrides=tuple(overrides),
                    strategy=strategy.name,
                    labels_per_class=budget,
                    seed=seed,
                    comparison_id=plan.comparison_id,
                    data_version=data_version,
                    after=tuple(after),
                    skipped_images=tuple(path for path, _ in skipped),
                    pool_seeds=plan.seeds,
                    pool_budget=max(plan.label_budgets),
                )
            )
    return cells


def first_transfer_cell(plan: ComparisonPlan) -> str | None:
    """The id of the comparison's first cell that trains on the frozen base's features."""
    strategy = next((s for s in plan.strategies if not s.from_scratch), None)
    if strategy is None:
        return None
    return cell_id(strategy.name, plan.label_budgets[0], plan.seeds[0])


def in_dependency_order(cells: Sequence[CellSpec]) -> list[CellSpec]:
    """Each seed's cells, those that wait for no other first, then those one cell deep, and so on.

    Cells are handed to the workers in this order: Prefect's process pool resolves a cell's
    upstream cells in as many threads as it has workers, so a cell that waits would otherwise
    hold back a ready one queued behind it, and leave a worker idle.
    """
    depth: dict[str, int] = {}
    seeds: dict[int, int] = {}
    for cell in cells:  # planned so that a cell comes after those it waits for
        depth[cell.id] = 1 + max((depth[upstream] for upstream in cell.after), default=-1)
        seeds.setdefault(cell.seed, len(seeds))
    return sorted(cells, key=lambda cell: (seeds[cell.seed], depth[cell.id]))


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
    from tasks.data.table import load_image_table
    from tasks.model.classifier import build_classifier_for
    from tasks.stages.base import StageInputs

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
    labelled = keep_labels_per_class(table, cell.labels_per_class, config.seed)
    classifier = build_classifier_for(strategy.loaded, len(labelled.classes))
    return strategy, StageInputs(
        classifier,
        labelled,
        strategy.loaded,
        cell.data_version,
        feature_pool(cell, table),
        stages_on_same_base(strategies, strategy),
    )


def train_cell(cell: CellSpec) -> str:
    """Train one strategy at one budget with one seed under its own MLflow parent run; its id.

    Resumes the stages another cell or run finished.
    """
    from tasks.stages.runner import run_stages

    strategy, inputs = set_up_cell(cell)
    config = strategy.loaded.config
    run = start_tracking(
        strategy.loaded,
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


def cell_outcome(
    run: RunRef, strategy: Strategy, labels_per_class: int, seed: int
) -> StrategyOutcome:
    """A finished cell as the comparison tabulates it, read back from its MLflow runs."""
    client = MlflowClient(run.tracking_uri)
    children = client.search_runs([run.experiment_id], f"tags.mlflow.parentRunId = '{run.run_id}'")
    by_stage = {child.data.tags["stage"]: child for child in children}
    missing = [stage.name for stage in strategy.stages if stage.name not in by_stage]
    if missing:
        raise RuntimeError(f"run {run.run_id} of {strategy.name} has no stage run for {missing}")
    summaries = [_stage_summary(by_stage[stage.name]) for stage in strategy.stages]
    final = by_stage[strategy.stages[-1].name]
    checkpoint = read_checkpoint(
        run.tracking_uri, final.data.tags.get(RESUMED_TAG, final.info.run_id)
    )
    history = checkpoint.history
    losses = history.epochs.get("val_loss")
    return StrategyOutcome(
        strategy=strategy.name,
        labels_per_class=labels_per_class,
        seed=seed,
        run=run,
        loaded=strategy.with_seed(seed).loaded,
        stages=tuple(summaries),
        final=StageRecord(final.data.tags["stage"], final.info.run_id, checkpoint.model_uri),
        evaluation=checkpoint.evaluation,
        validation_loss=float(losses[history.best_epoch]) if losses else None,
    )


def _stage_summary(stage_run) -> StageSummary:
    metrics, params = stage_run.data.metrics, stage_run.data.params
    return StageSummary(
        stage=stage_run.data.tags["stage"],
        test_accuracy=metrics["test_accuracy"],
        test_macro_f1=metrics["test_macro_f1"],
        trainable_params=int(params["trainable_params"]),
        learning_rate=float(params["learning_rate"]),
        epochs_run=int(metrics["epochs_run"]),
        train_seconds=metrics["train_seconds"],
    )


def find_cell_run(uri: str, experiment_id: str, cell: CellSpec) -> str:
    """The MLflow parent run a cell finished (for cells run elsewhere, e.g. on a work pool)."""
    runs = MlflowClient(uri).search_runs(
        [experiment_id],
        f"tags.comparison_id = '{cell.comparison_id}' and tags.strategy = '{cell.strategy}' "
        f"and tags.label_budget = '{cell.labels_per_class}' and tags.seed = '{cell.seed}' "
        "and attributes.status = 'FINISHED'",
        max_results=1,
    )
    if not runs:
        raise RuntimeError(
            f"cell {cell.id} finished but left no finished MLflow run in experiment "
            f"{experiment_id}; does the worker use the same MLFLOW_TRACKING_URI?"
        )
    return runs[0].info.run_id


# --- engines --------------------------------------------------------------------------------------


def cell_task_runner(compare: CompareConfig):
    """Local worker processes, or (with a work pool) threads that wait on the pool's flow runs.

    Worker processes report to the Prefect API this process uses, its temporary server too:
    left alone, each would start a temporary server of its own.
    """
    if compare.work_pool:
        return ThreadPoolTaskRunner(max_workers=compare.workers)
    runner = RecyclingProcessPoolTaskRunner(
        max_workers=compare.workers,
        initializer=start_worker,
        initargs=(prefect_api_url(), threads_per_worker(compare)),
    )
    runner.tasks_per_worker = compare.cells_per_worker
    return runner


class RecyclingProcessPoolTaskRunner(ProcessPoolTaskRunner):
    """Prefect's process pool, each worker process replaced after `tasks_per_worker` tasks.

    A worker grows with every model it trains (TensorFlow keeps per-model state that
    `clear_session` does not return), so a long grid would grow it without bound.
    """

    tasks_per_worker: int | None = None

    def duplicate(self):
        copy = super().duplicate()
        copy.tasks_per_worker = self.tasks_per_worker
        return copy

    def __enter__(self):
        super().__enter__()
        # The executor starts no process before its first task: replace it with one that
        # recycles, keeping the start method, initializer and arguments Prefect gave it.
        given = self._executor
        if given is not None and self.tasks_per_worker is not None:
            self._executor = _RecyclingExecutor(
                max_workers=given._max_workers,  # type: ignore[attr-defined]
                mp_context=given._mp_context,  # type: ignore[attr-defined]
                initializer=given._initializer,  # type: ignore[attr-defined]
                initargs=given._initargs,  # type: ignore[attr-defined]
                max_tasks_per_child=self.tasks_per_worker,
            )
            given.shutdown(wait=True)
        if not _in_worker.is_set():
            _start_workers_now(self._executor)
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        executor = self._executor
        if exc_type is None or issubclass(exc_type, Exception) or executor is None:
            super().__exit__(exc_type, exc_value, traceback)
            return
        # Stopped by a signal. Prefect's pool would wait for the cells in flight to finish, and
        # for the threads that hold queued cells until the cells they follow are done, which
        # may be never. Pass the signal on, so the cells in flight close their runs as KILLED
        # and their workers end (each within 10 s, see start_worker), then wait for nothing
        # else: the command exits without joining those threads (flows/cli.py).
        note_stop_requested()
        workers = list(getattr(executor, "_processes", {}).values())
        for process in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in workers:
            process.join(max(0.0, deadline - time.monotonic()))
        executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None
        resolver = getattr(self, "_resolver_executor", None)
        if resolver is not None:
            resolver.shutdown(wait=False, cancel_futures=True)
            self._resolver_executor = None
        self._stop_message_forwarding()
        TaskRunner.__exit__(self, exc_type, exc_value, traceback)


def _start_workers_now(executor) -> None:
    """Start every worker process now, not when its first cell is handed out.

    A worker's start (Python, then TensorFlow's import in start_worker, about 10 s on 2 cores)
    then overlaps the first cell, which every other cell waits for. The pool's manager thread
    starts with them, so that shutting the pool down stops them even if no cell ever came.
    Not in a worker: Prefect enters a copy of the flow's task runner around each task it runs
    there, and that copy runs nothing.
    """
    launch = getattr(executor, "_launch_processes", None)
    manage = getattr(executor, "_start_executor_manager_thread", None)
    if launch is None or manage is None or executor._executor_manager_thread is not None:
        return  # a Python whose pool has other internals: workers start with their first cell
    launch()
    manage()


def threads_per_worker(compare: CompareConfig) -> int:
    """TensorFlow threads for each local worker: as set, or this machine's cores shared out.

    Each of TensorFlow's thread pools defaults to every core, so N workers would run N times
    as many threads as there are cores; they then spin waiting on each other, and a comparison
    spends a sixth more CPU time on 2 cores (docs/performance.md).
    """
    if compare.threads_per_worker is not None:
        return compare.threads_per_worker
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // compare.workers)


def prefect_api_url() -> str | None:
    """PREFECT_API_URL as this process sees it, or the address of its temporary server."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url:
        return url
    server = SubprocessASGIServer()  # the process's one temporary server, if it started one
    return server.api_url if server.running else None


# Set in a worker process by start_worker.
_in_worker = threading.Event()


def start_worker(url: str | None, threads: int) -> None:
    """A worker process's set-up: the parent's Prefect API, TensorFlow's `threads` (before
    it runs anything), and ending with the parent.

    On SIGTERM the cell in flight stops with SystemExit, so its runs close as KILLED; a
    worker whose parent died (even by SIGKILL) sends itself SIGTERM rather than train on
    for no one. Whatever the cell does, the process is gone 10 s after the signal (Prefect
    would otherwise go on retrying to send its last events to a server that has stopped).
    """
    _in_worker.set()
    use_prefect_api(url)
    signal.signal(signal.SIGTERM, _leave_on_sigterm)
    parent = os.getppid()
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    # What every cell imports, imported while the worker waits for its first cell.
    import tasks.data.stream
    import tasks.data.table
    import tasks.model.classifier
    import tasks.stages.runner  # noqa: F401

    use_tensorflow_threads(threads)


def use_tensorflow_threads(threads: int | None) -> None:
    """TensorFlow's intra- and inter-op thread pools in this process, set before it runs any
    operation; None keeps TensorFlow's default (every core)."""
    if threads is None:
        return
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def refuse_if_stopping() -> None:
    """In a worker that SIGTERM reached: stop before the cell opens any run (the pool hands it
    the next queued cell as soon as the one in flight stops, and that cell's run would never
    close)."""
    # A function, not the flag itself, in the task: Prefect pickles the task's code with its
    # globals by value, and would copy the flag (or fail to pickle its lock).
    if stop_requested():
        raise SystemExit(128 + signal.SIGTERM)


def _leave_on_sigterm(signum: int, frame) -> None:
    exit_code = 128 + signum
    note_stop_requested()
    deadline = threading.Timer(10, os._exit, args=(exit_code,))
    deadline.daemon = True  # a worker that ends sooner must not wait for it
    deadline.start()
    raise SystemExit(exit_code)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(2)
    os.kill(os.getpid(), signal.SIGTERM)


def use_prefect_api(url: str | None) -> None:
    """In a worker process, before any task: talk to `url` (the parent's Prefect API).

    Task events and logs then go straight there too. Relayed through the parent, they would be
    sent by a thread that sees only the parent's global settings, not settings a caller set for
    the flow (`temporary_settings`), and could land on another server than the flow run.
    """
    if not url:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import set_api_log_sink

    os.environ["PREFECT_API_URL"] = url
    EventsWorker.set_client_override(None)
    set_api_log_sink(None)


class _RecyclingExecutor(ProcessPoolExecutor):
    """A process pool that starts a replacement whenever it has fewer processes than allowed.

    CPython 3.11's pool skips the replacement for a worker that left after its last task when it
    counts an idle worker, and that count can be the leaving worker's own: queued tasks then
    wait forever with no process to run them (seen here with queued cells).
    """

    def _adjust_process_count(self) -> None:
        idle = self._idle_worker_semaphore.acquire(blocking=False)  # type: ignore[attr-defined]
        if len(self._processes) < self._max_workers:  # type: ignore[attr-defined]
            self._spawn_process()  # type: ignore[attr-defined]
        elif idle:
            return


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
    from tasks.stages.feature_extraction import HeadOnFeatures

    strategy, inputs = set_up_cell(cell)
    first = strategy.stages[0]
    if isinstance(first, HeadOnFeatures) and first.settings.cache_dir:
        first.features(inputs)
    release_models()


@task(
    name="train-cell-on-work-pool",
    task_run_name="train-cell-on-work-pool[{cell.id}]",
    cache_policy=NO_CACHE,
)
def train_cell_on_pool(
    cell: CellSpec, work_pool: str, uri: str, experiment_id: str, timeout_minutes: int
) -> str:
    """One cell as a flow run of the `train-comparison-cell/<work_pool>` deployment."""
    from prefect.deployments import run_deployment

    flow_run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync in a sync task
        f"{CELL_FLOW}/{work_pool}",
        parameters={"cell": cell.model_dump(mode="json")},
        timeout=timeout_minutes * 60,
        tags=[
            f"strategy:{cell.strategy}",
            f"labels-per-class:{cell.labels_per_class}",
            f"seed:{cell.seed}",
        ],
    )
    state = flow_run.state
    if state is None or not state.is_completed():
        shown = state.name if state is not None else "no state"
        raise RuntimeError(
            f"cell {cell.id} ended {shown} on work pool {work_pool!r} (flow run {flow_run.id})"
        )
    return find_cell_run(uri, experiment_id, cell)


@task(name="read-cell-outcomes", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def read_cell_outcomes(
    comparison: RunRef, plan: ComparisonPlan, cells: list[CellSpec], run_ids: list[str]
) -> list[StrategyOutcome]:
    """Every cell's scores, stages and final model, from MLflow, in plan order."""
    strategies = {strategy.name: strategy for strategy in plan.strategies}
    return [
        cell_outcome(
            RunRef(run_id, comparison.experiment_id, comparison.tracking_uri),
            strategies[cell.strategy],
            cell.labels_per_class,
            cell.seed,
        )
        for cell, run_id in zip(cells, run_ids, strict=True)
    ]


@task(name="check-data-version", cache_policy=NO_CACHE)
def check_cell_data(cell: CellSpec, data_version: str) -> None:
    """Stop a worker whose checkout pins other data than the comparison it works for."""
    if data_version != cell.data_version:
        raise DataVersionChangedError(
            f"this worker's data is version {data_version}, the comparison's is "
            f"{cell.data_version}: check out the same commit of data.dvc on every worker"
        )
