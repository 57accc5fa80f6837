"""The scheduled retraining flow: update the checkout -> check for changes -> train only if needed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from prefect import Flow, flow
from prefect.schedules import Cron

from flows.train import DEFAULT_CONFIG, TrainingResult, train_classifier
from tasks.registry.freshness import (
    ProjectUpdate,
    RetrainDecision,
    check_for_changes,
    publish_decision,
    update_checkout,
)
from tasks.stages.preflight import load_and_check, load_pipeline_config


@dataclass(frozen=True)
class RetrainResult:
    """What the check decided and, when it retrained, the training run's result."""

    decision: RetrainDecision
    update: ProjectUpdate | None
    training: TrainingResult | None

    @property
    def up_to_date(self) -> bool:
        return self.training is None


@flow(name="retrain-classifier", log_prints=True)
def retrain_classifier(
    config_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None
) -> RetrainResult:
    """Retrain and go through the promotion gate, unless the champion already saw this data and config."""
    overrides = overrides or []
    loaded = load_pipeline_config(config_path, overrides)
    update = None
    if loaded.config.schedule.git_pull:
        update = update_checkout(loaded.project)
        loaded = load_pipeline_config(config_path, overrides)  # the pull may have changed it
    decision = check_for_changes(loaded.config, loaded.project)
    publish_decision(decision, update)
    training = train_classifier(config_path, overrides) if decision.retrain else None
    return RetrainResult(decision=decision, update=update, training=training)


def serve_retraining(config_path: str, overrides: list[str]) -> None:
    """Register the deployment on the config's cron schedule and run its flow runs; blocks."""
    retrain_classifier.serve(**_deployment(config_path, overrides))


def deploy_retraining(config_path: str, overrides: list[str], work_pool: str) -> None:
    """Register the same deployment for the workers of a work pool to run; returns at once."""
    code = Path(__file__).resolve().parents[1]  # workers run the flow from this checkout
    from_code = retrain_classifier.from_source(str(code), "flows/retrain.py:retrain_classifier")
    cast(Flow, from_code).deploy(  # from_source returns the flow itself when called without await
        work_pool_name=work_pool, print_next_steps=False, **_deployment(config_path, overrides)
    )


def _deployment(config_path: str, overrides: list[str]) -> dict[str, Any]:
    schedule = load_and_check(config_path, overrides).config.schedule
    return {
        "name": schedule.deployment_name,
        "schedules": [Cron(schedule.cron, timezone=schedule.timezone)],
        "parameters": {"config_path": str(Path(config_path).resolve()), "overrides": overrides},
        "description": "Retrains the classifier when data.dvc or the training config changed.",
        "tags": ["retraining"],
    }
