"""The data gate alone: pull the pinned data, check it, write reports/data_checks/."""

from __future__ import annotations

from prefect import flow

from flows.train import DEFAULT_CONFIG
from tasks.data.table import load_images
from tasks.data.versioning import pull_data_version
from tasks.stages.base import StageInputs
from tasks.stages.data_gate import DataGate, check_data, gate_classifier
from tasks.stages.plan import transfer_stages
from tasks.stages.preflight import check_training_inputs, load_and_check


@flow(name="check-data", log_prints=True)
def check_data_only(
    config_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None
) -> DataGate:
    """Run the checks the training flow runs before it trains, and nothing else.

    The frozen base is built only for the label check and the domain fit, which read its
    features; they land in the feature cache, where the next training run finds them.
    """
    loaded = load_and_check(config_path, overrides or [])
    config, project = loaded.config, loaded.project
    check_training_inputs(loaded)
    data_version = pull_data_version(config.data, project, config.timeouts.dvc_pull_seconds)
    table = load_images(config.data, project, config.seed, data_version)
    stages = transfer_stages(config)
    classifier = gate_classifier(loaded, table)
    return check_data(stages, StageInputs(classifier, table, loaded, data_version))
