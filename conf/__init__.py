"""Configuration: YAML files validated by the tree of models rooted at conf.schema.PipelineConfig."""

from conf.data import DemoDataConfig
from conf.errors import ExpectedError
from conf.loader import ConfigError, LoadedConfig, load_config, project_root
from conf.schema import PipelineConfig

__all__ = [
    "ConfigError",
    "DemoDataConfig",
    "ExpectedError",
    "LoadedConfig",
    "PipelineConfig",
    "load_config",
    "project_root",
]
