"""The first step of every flow: load the config and reject what cannot work, before any work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from conf import PipelineConfig, load_config, project_root
from tasks.model import check_architecture
from tasks.tracking import check_tracking_server, tracking_uri


@dataclass(frozen=True)
class LoadedConfig:
    config: PipelineConfig
    project: Path

    def path(self, relative: str) -> Path:
        """A config path resolved against the project root."""
        return (self.project / relative).resolve()


def load_and_check(
    config_path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> LoadedConfig:
    """Validate the config file and its overrides, and the architecture name."""
    config = load_config(config_path, overrides)
    check_architecture(config.base.architecture)
    return LoadedConfig(config, project_root(config_path))


@task(name="load-config", cache_policy=NO_CACHE)
def load_pipeline_config(config_path: str, overrides: list[str]) -> LoadedConfig:
    """The config, checked, once the tracking server it will log to is known to answer."""
    loaded = load_and_check(config_path, overrides)
    check_tracking_server(tracking_uri(loaded.project))
    return loaded
