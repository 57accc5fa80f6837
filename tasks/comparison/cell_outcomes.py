"""Finished cells read back from MLflow: each one's stage runs, test scores and final model."""

from __future__ import annotations

from mlflow import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.comparison.cells import CellSpec
from tasks.comparison.strategies import ComparisonPlan, Strategy
from tasks.comparison.table import StrategyOutcome
from tasks.tracking.checkpoints import RESUMED_TAG, read_checkpoint
from tasks.tracking.history import StageSummary
from tasks.tracking.runs import RunRef, StageRecord


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
