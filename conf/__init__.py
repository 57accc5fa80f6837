"""Configuration: YAML files validated by the models in conf.schema."""

from conf.errors import ExpectedError
from conf.loader import ConfigError, load_config, project_root
from conf.schema import DemoDataConfig, PipelineConfig

__all__ = [
    "ConfigError",
    "DemoDataConfig",
    "ExpectedError",
    "PipelineConfig",
    "load_config",
    "project_root",
]
