"""The data gate alone: pull the pinned data, check it, write reports/data_checks/."""

from __future__ import annotations

from prefect import flow

from flows.train import DEFAULT_CONFIG
from tasks.data.table import load_images
from tasks.data.versioning import pull_data_version
from tasks.model.classifier import build_classifier_for
from tasks.stages.base import StageInputs
from tasks.stages.data_gate import DataGate, check_data
from tasks.stages.plan import transfer_stages
from tasks.stages.preflight import check_training_inputs, load_and_check


@flow(name="check-data", log_prints=True)
def check_data_only(
    config_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None
) -> DataGate:
    """Run the checks the training flow runs before it trains, and nothing else.

    The frozen base is built only for the label check, which needs its features; they land in
    the feature cache, where the next training run finds them.
    """
    loaded = load_and_check(config_path, overrides or [])
    config, project = loaded.config, loaded.project
    check_training_inputs(loaded)
    data_version = pull_data_version(config.data, project, config.timeouts.dvc_pull_seconds)
    table = load_images(config.data, project, config.seed, data_version)
    classifier = None
    if config.data.checks.label_issue != "off":
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
    return check_data(stages, StageInputs(classifier, table, loaded, data_version))  # type: ignore[arg-type]
