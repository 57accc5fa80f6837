"""The training flow: pull data -> build base -> train head -> unfreeze stage by stage -> register."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow

from tasks.data.checks import DataChecksFailedError
from tasks.data.table import load_images
from tasks.data.versioning import pull_data_version
from tasks.model.classifier import build_classifier_for
from tasks.registry.decision import PromotionDecision
from tasks.registry.promotion import check_gate_power, promote_if_better, register_challenger_step
from tasks.registry.versions import config_fingerprint
from tasks.report.summary import publish_report
from tasks.runtime.run_names import label_flow_run
from tasks.stages.base import StageInputs
from tasks.stages.data_gate import check_data, pool_after
from tasks.stages.plan import transfer_stages
from tasks.stages.preflight import check_training_inputs, load_pipeline_config
from tasks.stages.runner import run_stages
from tasks.tracking.history import StageSummary
from tasks.tracking.runs import close_run_after_failure
from tasks.tracking.steps import finish_tracking, log_data_checks, start_tracking

DEFAULT_CONFIG = "conf/default.yaml"
STRATEGY = "fine_tune"


@dataclass(frozen=True)
class ResumedStage:
    """A stage this run did not train: the run that did."""

    stage: str
    run_id: str


@dataclass(frozen=True)
class TrainingResult:
    """What a training run produced: its MLflow run, per-stage scores, and the registry outcome.

    `skipped_images` counts the undecodable image files left out (`data.on_bad_images: skip`).
    """

    run_id: str
    experiment_id: str
    tracking_uri: str
    data_version: str
    stages: list[StageSummary]
    resumed: list[ResumedStage]
    model_name: str
    version: str
    decision: PromotionDecision
    skipped_images: int = 0


@flow(name="train-classifier", log_prints=True)
def train_classifier(
    config_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None
) -> TrainingResult:
    """Train a transfer-learning classifier and register it; promote it only if it beats the champion.

    Stages that an earlier run already finished the same way (same data, base, head, seed and
    settings up to them) are resumed from their checkpoints instead of trained again.
    """
    loaded = load_pipeline_config(config_path, overrides or [])
    config, project = loaded.config, loaded.project
    check_training_inputs(loaded)
    data_version = pull_data_version(config.data, project, config.timeouts.dvc_pull_seconds)
    label_flow_run("train", config.registry.model_name, data_version, [STRATEGY])
    table = load_images(config.data, project, config.seed, data_version)
    check_gate_power(config.registry, table)
    classifier = build_classifier_for(
        config.base,
        config.head,
        config.compute,
        config.data.image_size,
        config.seed,
        project,
        len(table.classes),
    )
    stages = transfer_stages(config)
    gate = check_data(stages, StageInputs(classifier, table, loaded, data_version))
    inputs = StageInputs(
        classifier, gate.outcome.table, loaded, data_version, feature_pool=pool_after(gate, table)
    )
    table = inputs.table
    run = start_tracking(config, project, table, data_version, strategy=STRATEGY)
    try:
        log_data_checks(run, gate.record, gate.outcome.decision, gate.report)
        if gate.failed:
            raise DataChecksFailedError(gate.line)
        outcome = run_stages(run, stages, inputs, resume=config.tracking.resume)
        challenger = register_challenger_step(
            run,
            outcome.records[-1],
            table,
            config.registry.model_name,
            config.base,
            config.data.image_size,
            config_fingerprint(config),
            data_version,
        )
        decision = promote_if_better(
            run,
            challenger,
            outcome.evaluation,
            table,
            config.registry,
            config.evaluation.primary_metric,
            config.data.batch_size,
            config.seed,
        )
    except BaseException as error:
        close_run_after_failure(run, error)
        raise
    finish_tracking(run, summaries=outcome.summaries, failed=False)
    skipped_images = len(table.skipped)
    publish_report(
        run,
        outcome.summaries,
        outcome.histories,
        challenger,
        decision,
        outcome.evaluation,
        project,
        skipped_images,
    )
    return TrainingResult(
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        tracking_uri=run.tracking_uri,
        data_version=data_version,
        stages=outcome.summaries,
        resumed=[ResumedStage(done.stage, done.run_id) for done in outcome.resumed],
        model_name=challenger.name,
        version=challenger.version,
        decision=decision,
        skipped_images=skipped_images,
    )
