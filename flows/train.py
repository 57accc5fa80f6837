"""The training flow: pull data -> build base -> train head -> unfreeze stage by stage -> register."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow

from tasks.comparison import SharedStages, start_from, trained_stage
from tasks.config import load_pipeline_config
from tasks.data import load_images, pull_data_version
from tasks.evaluate import Evaluation, evaluate_on_features, evaluate_on_images
from tasks.features import extract_frozen_features
from tasks.model import build_classifier_for
from tasks.registry import PromotionDecision, promote_if_better, register_challenger_step
from tasks.report import StageSummary, publish_report
from tasks.tracking import (
    StageRecord,
    finish_tracking,
    log_reused_stage,
    log_stage_run,
    start_tracking,
)
from tasks.train import fine_tune_stage, train_new_head

DEFAULT_CONFIG = "conf/default.yaml"


@dataclass(frozen=True)
class TrainingResult:
    """What a training run produced: its MLflow run, per-stage scores, and the registry outcome."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    data_version: str
    stages: list[StageSummary]
    model_name: str
    version: str
    decision: PromotionDecision


@dataclass(frozen=True)
class StagesOutcome:
    """Every stage's MLflow record and scores, and the final stage's evaluation."""

    records: list[StageRecord]
    summaries: list[StageSummary]
    evaluation: Evaluation


def transfer_stages(
    run, classifier, table, loaded, data_version: str, shared: SharedStages | None = None
) -> StagesOutcome:
    """Feature extraction on the frozen base, then each configured unfreezing stage, each logged.

    With `shared` (the comparison flow), stages an earlier strategy already trained the same way
    are recorded as reused and training resumes from their weights.
    """
    config = loaded.config
    reused = shared.reusable(config) if shared is not None else []
    records = [
        log_reused_stage(run, done.name, done.settings, done.history, done.evaluation, done.record)
        for done in reused
    ]
    summaries = [done.summary for done in reused]

    def remember(number: int, name: str, stage_settings, history, evaluation) -> None:
        """Keep the stage just logged (records[-1]) for later strategies that begin the same way."""
        if shared is not None:
            trained = trained_stage(
                name, stage_settings, history, evaluation, records[-1], classifier
            )
            shared.keep(config, number, trained)

    settings = config.feature_extraction
    if reused:
        start_from(classifier, reused[-1])
        evaluation = reused[-1].evaluation
    else:
        features = extract_frozen_features(classifier, table, loaded, data_version)
        history = train_new_head(classifier, features, config)
        evaluation = evaluate_on_features(classifier, features["test"], table.classes)
        records.append(
            log_stage_run(
                run, "feature_extraction", settings, history, evaluation, classifier, table, loaded
            )
        )
        summaries.append(StageSummary.of("feature_extraction", history, evaluation))
        remember(0, "feature_extraction", settings, history, evaluation)
    rates = config.fine_tune.learning_rates(settings.learning_rate)
    for number, (stage, rate) in enumerate(zip(config.fine_tune.stages, rates, strict=True), 1):
        if number < len(reused):
            continue
        name = f"fine_tune_{number}"
        history = fine_tune_stage(classifier, table, stage, rate, config)
        evaluation = evaluate_on_images(classifier.model, table, config)
        records.append(
            log_stage_run(run, name, stage, history, evaluation, classifier, table, loaded)
        )
        summaries.append(StageSummary.of(name, history, evaluation))
        remember(number, name, stage, history, evaluation)
    return StagesOutcome(records, summaries, evaluation)


@flow(name="train-classifier", log_prints=True)
def train_classifier(
    config_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None
) -> TrainingResult:
    """Train a transfer-learning classifier and register it; promote it only if it beats the champion."""
    loaded = load_pipeline_config(config_path, overrides or [])
    data_version = pull_data_version(loaded)
    table = load_images(loaded, data_version)
    classifier = build_classifier_for(loaded, len(table.classes))
    run = start_tracking(loaded, table, data_version, strategy="fine_tune")
    try:
        stages = transfer_stages(run, classifier, table, loaded, data_version)
        records, summaries, evaluation = stages.records, stages.summaries, stages.evaluation
        challenger = register_challenger_step(run, records[-1], table, loaded, data_version)
        decision = promote_if_better(run, challenger, evaluation, table, loaded)
    except BaseException:
        finish_tracking(run, summaries=[], failed=True)
        raise
    finish_tracking(run, summaries=summaries, failed=False)
    publish_report(run, summaries, challenger, decision, evaluation, loaded)
    return TrainingResult(
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        tracking_uri=run.tracking_uri,
        data_version=data_version,
        stages=summaries,
        model_name=challenger.name,
        version=challenger.version,
        decision=decision,
    )
