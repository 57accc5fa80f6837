"""The comparison flow: every configured strategy, at every label budget, on one data version."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from prefect import flow, tags

from flows.train import transfer_stages
from tasks.comparison import (
    SCRATCH_STAGE,
    ComparisonFiles,
    SharedStages,
    Strategy,
    StrategyOutcome,
    fail_comparison_run,
    label_budget_tables,
    labelled_subset_name,
    log_comparison,
    log_strategy_summary,
    pick_best_strategy,
    plan_comparison,
    publish_comparison,
    start_comparison_run,
    tabulate_comparison,
)
from tasks.config import load_pipeline_config
from tasks.data import ImageTable, load_images, pull_data_version
from tasks.evaluate import evaluate_on_images
from tasks.model import build_classifier_for
from tasks.registry import PromotionDecision, promote_if_better, register_challenger_step
from tasks.report import StageSummary
from tasks.tracking import finish_tracking, log_stage_run, start_tracking
from tasks.train import train_from_scratch

DEFAULT_CONFIG = "conf/compare.yaml"


@dataclass(frozen=True)
class ComparisonResult:
    """The comparison table, where it is tracked, and what happened to the winner's model."""

    comparison_id: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    data_version: str
    table: pd.DataFrame
    best_strategy: str
    best_run_id: str
    model_name: str
    version: str
    decision: PromotionDecision
    files: ComparisonFiles


@flow(name="compare-strategies", log_prints=True)
def compare_strategies(
    config_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None
) -> ComparisonResult:
    """Train each strategy at each label budget on the same data, split and seed; register the best."""
    loaded = load_pipeline_config(config_path, overrides or [])
    plan = plan_comparison(loaded)
    data_version = pull_data_version(loaded)
    table = load_images(loaded, data_version)
    budgets = label_budget_tables(table, plan.label_budgets, loaded.config.seed)
    comparison = start_comparison_run(loaded, plan, table, data_version)
    try:
        outcomes = []
        for budget, labelled in budgets.items():
            shared = SharedStages()
            for strategy in plan.strategies:
                with tags(f"strategy:{strategy.name}", f"labels-per-class:{budget}"):
                    outcomes.append(
                        train_strategy(
                            strategy, labelled, budget, data_version, plan.comparison_id, shared
                        )
                    )
        frame = tabulate_comparison(outcomes)
        best = pick_best_strategy(outcomes, plan.metric)
        challenger = register_challenger_step(
            best.run, best.final, table, best.loaded, data_version
        )
        decision = promote_if_better(best.run, challenger, best.evaluation, table, best.loaded)
    except BaseException:
        fail_comparison_run(comparison)
        raise
    log_comparison(comparison, frame, plan.metric, best, challenger, decision)
    files = publish_comparison(frame, plan.metric, best, challenger, decision, loaded)
    return ComparisonResult(
        comparison_id=plan.comparison_id,
        run_id=comparison.run_id,
        experiment_id=comparison.experiment_id,
        tracking_uri=comparison.tracking_uri,
        data_version=data_version,
        table=frame,
        best_strategy=best.strategy,
        best_run_id=best.run.run_id,
        model_name=challenger.name,
        version=challenger.version,
        decision=decision,
        files=files,
    )


def train_strategy(
    strategy: Strategy,
    table: ImageTable,
    labels_per_class: int,
    data_version: str,
    comparison_id: str,
    shared: SharedStages,
) -> StrategyOutcome:
    """One strategy at one label budget: its own MLflow parent run, one nested run per stage.

    The training flow's own steps. Strategies on the same frozen base read the same cached
    features, so only the first one pays for the forward pass; a strategy that begins with
    stages an earlier one trained the same way (fine_tune_2 after fine_tune_1) starts from them.
    """
    loaded = strategy.loaded
    config = loaded.config
    classifier = build_classifier_for(loaded, len(table.classes))
    run = start_tracking(
        loaded,
        table,
        data_version,
        strategy=strategy.name,
        run_name=f"{strategy.name}-{labels_per_class}-per-class",
        tags={"comparison_id": comparison_id, "label_budget": str(labels_per_class)},
        dataset_name=labelled_subset_name(config.data.path, labels_per_class),
    )
    try:
        if strategy.scratch is not None:
            history = train_from_scratch(classifier, table, strategy.scratch, config)
            evaluation = evaluate_on_images(classifier.model, table, config)
            records = [
                log_stage_run(
                    run,
                    SCRATCH_STAGE,
                    strategy.scratch,
                    history,
                    evaluation,
                    classifier,
                    table,
                    loaded,
                )
            ]
            summaries = [StageSummary.of(SCRATCH_STAGE, history, evaluation)]
        else:
            stages = transfer_stages(run, classifier, table, loaded, data_version, shared)
            records, summaries, evaluation = stages.records, stages.summaries, stages.evaluation
        log_strategy_summary(run, labels_per_class, summaries)
    except BaseException:
        finish_tracking(run, summaries=[], failed=True)
        raise
    finish_tracking(run, summaries=summaries, failed=False)
    return StrategyOutcome(
        strategy=strategy.name,
        labels_per_class=labels_per_class,
        run=run,
        loaded=loaded,
        stages=tuple(summaries),
        final=records[-1],
        evaluation=evaluation,
    )
