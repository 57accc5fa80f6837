"""Read a YAML config (with `extends:` parents and `key.path=value` overrides) and validate it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from conf.errors import ExpectedError
from conf.schema import PipelineConfig

Model = TypeVar("Model", bound=BaseModel)


class ConfigError(ExpectedError, ValueError):
    """A config file or override that cannot be used; the message names the key."""


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(tree).__name__}")
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    return _merge(_read_yaml(path.parent / parent, (*seen, path)), tree)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(tree: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} must look like section.key=value")
    *parents, leaf = key.strip().split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[leaf] = yaml.safe_load(raw)


def _validate(model: type[Model], tree: dict[str, Any], source: str) -> Model:
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "(top level)"
            problems.append(f"  {where}: {error['msg']}")
        raise ConfigError(f"{source} is not a valid config:\n" + "\n".join(problems)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a pipeline config; `overrides` are `section.key=value` strings parsed as YAML."""
    tree = _read_yaml(Path(path))
    for override in overrides:
        _apply_override(tree, override)
    return _validate(PipelineConfig, tree, str(path))


def project_root(config_path: str | Path) -> Path:
    """The folder config paths are relative to: the nearest DVC or git repository above the file."""
    start = Path(config_path).resolve().parent
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return start


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config and the project folder its relative paths resolve against."""

    config: PipelineConfig
    project: Path

    def path(self, relative: str) -> Path:
        """A config path resolved against the project root."""
        return (self.project / relative).resolve()
