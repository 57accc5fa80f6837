"""The comparison flow: every configured strategy, at every label budget, on one data version."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from prefect import flow

from conf import LoadedConfig
from tasks.comparison.cell_outcomes import read_cell_outcomes
from tasks.comparison.cell_training import cache_shared_features, train_cell_step
from tasks.comparison.cells import CellSpec, first_transfer_cell, in_dependency_order, plan_cells
from tasks.comparison.records import (
    ComparisonFiles,
    log_cell_summaries,
    log_comparison,
    publish_comparison,
    start_comparison_run,
)
from tasks.comparison.strategies import (
    ComparisonPlan,
    check_label_budgets,
    plan_comparison,
    stages_on_same_base,
)
from tasks.comparison.winner import summarize_comparison
from tasks.comparison.work_pool import train_cell_on_pool
from tasks.comparison.workers import cell_task_runner
from tasks.data.check_record import reads_features
from tasks.data.checks import DataChecksFailedError
from tasks.data.table import ImageTable, load_images
from tasks.data.versioning import pull_data_version
from tasks.registry.decision import PromotionDecision
from tasks.registry.promotion import check_gate_power, promote_if_better, register_challenger_step
from tasks.registry.versions import config_fingerprint
from tasks.runtime.run_names import label_flow_run
from tasks.stages.base import Stage, StageInputs
from tasks.stages.data_gate import check_data, gate_classifier
from tasks.stages.preflight import load_pipeline_config
from tasks.tracking.runs import RunRef, close_run_after_failure
from tasks.tracking.steps import log_data_checks

DEFAULT_CONFIG = "conf/compare.yaml"


@dataclass(frozen=True)
class ComparisonResult:
    """The comparison table, where it is tracked, and what happened to the winner's model.

    `table` has one row per strategy and budget (means and intervals over the seeds), `runs`
    one per seed as well.
    """

    comparison_id: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    data_version: str
    table: pd.DataFrame
    runs: pd.DataFrame
    best_strategy: str
    best_run_id: str
    winner_reason: str
    model_name: str
    version: str
    decision: PromotionDecision
    files: ComparisonFiles


@flow(name="compare-strategies", log_prints=True)
def compare_strategies(
    config_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None
) -> ComparisonResult:
    """Train each strategy at each label budget with each seed on one data version and split;
    register the cheapest strategy that the intervals cannot tell from the best.

    Each cell (a strategy at a budget with a seed) trains in a worker (`compare.workers` local
    processes, or flow runs on the work pool `compare.work_pool`); cells share cached features
    and the stages they begin with through the feature cache and MLflow checkpoints.
    """
    loaded = load_pipeline_config(config_path, overrides or [])
    config, project = loaded.config, loaded.project
    plan = plan_comparison(loaded)
    data_version = pull_data_version(config.data, project, config.timeouts.dvc_pull_seconds)
    label_flow_run("compare", config.registry.model_name, data_version, plan.strategy_names)
    table = load_images(config.data, project, config.seed, data_version)
    check_gate_power(config.registry, table)
    gate = check_data(*gate_inputs(plan, loaded, table, data_version))
    table = gate.outcome.table
    check_label_budgets(table, plan.label_budgets, config.seed)
    comparison = start_comparison_run(
        config.data,
        config.compare,
        config.seed,
        config.tracking,
        project,
        plan,
        table,
        data_version,
    )
    try:
        log_data_checks(comparison, gate.record, gate.outcome.decision, gate.report)
        if gate.failed:
            raise DataChecksFailedError(gate.line)
        compare = config.compare
        local = compare.work_pool is None
        cells = plan_cells(
            plan,
            config_path,
            overrides or [],
            data_version,
            table.skipped,
            dropped=gate.outcome.dropped["path"].tolist(),
            pool_whole_split=reads_features(config.data.checks),
            features_cached_first=local,
        )
        first_id = first_transfer_cell(plan)
        first = next((cell for cell in cells if cell.id == first_id), None)
        run_ids = train_cells.with_options(task_runner=cell_task_runner(compare))(
            cells,
            compare.work_pool,
            compare.cell_timeout_minutes,
            comparison,
            cache_first=first if local else None,
        )
        outcomes = read_cell_outcomes(comparison, plan, cells, run_ids)
        summary = summarize_comparison(outcomes, plan)
        log_cell_summaries(comparison, plan, summary.cells)
        best = summary.winner.outcome
        winning = best.loaded.config
        challenger = register_challenger_step(
            best.run,
            best.final,
            table,
            winning.registry.model_name,
            winning.base,
            winning.data.image_size,
            config_fingerprint(winning),
            data_version,
            summary.winner.notes(),
        )
        decision = promote_if_better(
            best.run,
            challenger,
            best.evaluation,
            table,
            winning.registry,
            winning.evaluation.primary_metric,
            winning.data.batch_size,
            winning.seed,
        )
    except BaseException as error:
        close_run_after_failure(comparison, error)
        raise
    log_comparison(comparison, summary, plan.metric, challenger, decision)
    files = publish_comparison(summary, plan.metric, challenger, decision, project)
    return ComparisonResult(
        comparison_id=plan.comparison_id,
        run_id=comparison.run_id,
        experiment_id=comparison.experiment_id,
        tracking_uri=comparison.tracking_uri,
        data_version=data_version,
        table=summary.table,
        runs=summary.runs,
        best_strategy=summary.winner.strategy,
        best_run_id=best.run.run_id,
        winner_reason=summary.winner.reason,
        model_name=challenger.name,
        version=challenger.version,
        decision=decision,
        files=files,
    )


def gate_inputs(
    plan: ComparisonPlan, loaded: LoadedConfig, table: ImageTable, data_version: str
) -> tuple[tuple[Stage, ...], StageInputs]:
    """The data gate's stages and inputs: the first transfer strategy's, so that its feature
    pass is the one the cells share (every training image's features, and the activations at
    the cuts of the strategies on the same base), and the cells find it all cached."""
    first = next((strategy for strategy in plan.strategies if not strategy.from_scratch), None)
    stages = first.stages if first is not None else ()
    shared = stages_on_same_base(plan.strategies, first) if first is not None else ()
    classifier = gate_classifier(loaded, table)
    return stages, StageInputs(classifier, table, loaded, data_version, shared_stages=shared)


@flow(name="train-comparison-cells")
def train_cells(
    cells: list[CellSpec],
    work_pool: str | None,
    timeout_minutes: int,
    comparison: RunRef,
    cache_first: CellSpec | None = None,
) -> list[str]:
    """Every cell on the flow's task runner, each after the cells it resumes from; their run ids.

    With `cache_first`, the features every cell shares are cached here first, while the local
    worker processes start.
    """
    if cache_first is not None:
        cache_shared_features(cache_first)
    futures: dict = {}
    for cell in in_dependency_order(cells):
        after = [futures[upstream] for upstream in cell.after]
        if work_pool:
            futures[cell.id] = train_cell_on_pool.submit(
                cell,
                work_pool,
                comparison.tracking_uri,
                comparison.experiment_id,
                timeout_minutes,
                wait_for=after,
            )  # type: ignore[call-overload]  # the stubs' overloads leave out wait_for
        else:
            futures[cell.id] = train_cell_step.submit(cell, wait_for=after)  # type: ignore[call-overload]
    return [futures[cell.id].result() for cell in cells]
