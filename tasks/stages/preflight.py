"""The first step of every flow: load the config and reject what cannot work, before any work."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from conf import LoadedConfig, load_config, project_root
from tasks.inference.features import check_cache_dir
from tasks.model.bases import check_architecture, resolve_weights
from tasks.model.blocks import base_block_count, check_unfreeze_depths
from tasks.runtime.timeouts import bound_mlflow_calls
from tasks.runtime.tracking_server import check_tracking_server, tracking_uri


def load_and_check(
    config_path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> LoadedConfig:
    """Validate the config file and its overrides, and the architecture name."""
    config = load_config(config_path, overrides)
    check_architecture(config.base.architecture)
    return LoadedConfig(config, project_root(config_path))


def check_training_config(loaded: LoadedConfig) -> None:
    """The weights file exists, every fine-tuning stage fits in the base's blocks, and the
    feature cache folder can be written.

    Each fails in seconds here; otherwise only after the data pull, a forward pass, the head's
    training or a logged model.
    """
    config = loaded.config
    if config.feature_extraction.cache_dir:
        check_cache_dir(loaded.path(config.feature_extraction.cache_dir))
    base = config.base
    weights = base.weights
    if weights not in (None, "imagenet"):
        weights = str(loaded.path(weights))  # a weights file named relative to the project
    resolve_weights(base.architecture, weights, base.options, config.data.image_size)
    depths = [stage.unfreeze_blocks for stage in config.fine_tune.stages]
    if any(isinstance(depth, int) for depth in depths):
        blocks = base_block_count(base.architecture, config.data.image_size, base.options)
        check_unfreeze_depths(depths, blocks, base.architecture)


@task(name="load-config", cache_policy=NO_CACHE)
def load_pipeline_config(config_path: str, overrides: list[str]) -> LoadedConfig:
    """The config, checked, once the tracking server it will log to is known to answer.

    From here on every MLflow call of this process, and of the workers it starts, gives up
    within `timeouts.mlflow_seconds`.
    """
    loaded = load_and_check(config_path, overrides)
    bound_mlflow_calls(loaded.config.timeouts.mlflow_seconds)
    check_tracking_server(tracking_uri(loaded.project))
    return loaded


@task(name="check-training-inputs", cache_policy=NO_CACHE)
def check_training_inputs(loaded: LoadedConfig) -> None:
    """What the config names for training exists and fits, before any data is pulled."""
    check_training_config(loaded)
