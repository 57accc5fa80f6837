"""Registered model versions: register a challenger, find one by number or alias, load it back.

A version carries the fingerprint of the config it was trained with (`config_fingerprint`), so a
scheduled run can tell whether retraining would give anything new.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from conf.errors import ExpectedError
from conf.schema import PipelineConfig
from tasks.runtime.credentials import redact_url
from tasks.runtime.tracking_server import using_tracking_uri

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_DESCRIPTION = (
    "Image classifier trained by the transfer-learning pipeline. Each version says what it was "
    "trained on and how it scored; its tags hold the data version, config hash and classes. "
    "Alias `champion`: the version that serves, moved only by the promotion gate or by hand "
    "(its history is the tag `champion.history`). Alias `challenger`: the latest version "
    "registered."
)


class RegistryActionError(ExpectedError, ValueError):
    """A promotion or rollback asked for something the registry cannot do as given."""


class UnknownModelVersionError(RegistryActionError):
    """The registered model or the version does not exist."""


@dataclass(frozen=True)
class ModelVersionRef:
    """A registered model version and what it was trained on."""

    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _version_ref(version) -> ModelVersionRef:
    return ModelVersionRef(version.name, str(version.version), version.run_id, dict(version.tags))


def aliased_version(uri: str, name: str, alias: str) -> ModelVersionRef | None:
    """The version an alias points to, or None when the model or the alias does not exist."""
    try:
        return _version_ref(MlflowClient(uri).get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            return None
        raise


def registered_version(uri: str, name: str, version: str | int) -> ModelVersionRef | None:
    """A version of a registered model, or None when the model or the version does not exist."""
    return find_version(MlflowClient(uri), name, str(version))


def register_challenger(
    uri: str,
    model_uri: str,
    name: str,
    run_id: str,
    tags: dict[str, str],
    description: str | None = None,
) -> ModelVersionRef:
    """Register the model as a new version and point `challenger` at it.

    `description` becomes the version's; a registered model without a description of its own
    gets one that says what its aliases mean.
    """
    with using_tracking_uri(uri):
        version = mlflow.register_model(model_uri, name, tags={**tags, "run_id": run_id})
    client = MlflowClient(uri)
    if description:
        client.update_model_version(name, str(version.version), description=description)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=MODEL_DESCRIPTION)
    client.set_registered_model_alias(name, CHALLENGER, str(version.version))
    return _version_ref(client.get_model_version(name, str(version.version)))


def load_keras_model(model_uri: str, uri: str):
    """A registered or logged model loaded back as Keras, to score it on fresh data."""
    with using_tracking_uri(uri):
        return keras_model_of(model_uri)


def keras_model_of(model_uri: str):
    """The Keras classifier inside a serving model, or a model logged with the tensorflow flavor.

    Versions registered before serving models existed are plain tensorflow-flavor models. Call
    with the tracking URI set (`using_tracking_uri`).
    """
    import mlflow.pyfunc
    import mlflow.tensorflow
    from mlflow.models import get_model_info

    if "tensorflow" in get_model_info(model_uri).flavors:
        return mlflow.tensorflow.load_model(model_uri)
    return load_pyfunc(model_uri).unwrap_python_model().keras_model


def load_pyfunc(model_uri: str):
    """The model at `model_uri` as MLflow's pyfunc, with this process's import path as it was.

    MLflow puts a model's shipped code (a `tasks` package holding only what serving needs) first
    on sys.path to load it. This process has imported the project's own `tasks` already, but a
    worker it spawns afterwards inherits the path and would import that partial package instead.
    """
    import mlflow.pyfunc

    path = list(sys.path)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    finally:
        sys.path[:] = path


def existing_model(client: MlflowClient, uri: str, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UnknownModelVersionError(
            f"there is no registered model {name!r} in {redact_url(uri)}; check --model and MLFLOW_TRACKING_URI"
        ) from None


def existing_version(client: MlflowClient, uri: str, name: str, version: str) -> ModelVersionRef:
    existing_model(client, uri, name)
    found = find_version(client, name, version)
    if found is None:
        versions = sorted(
            (str(v.version) for v in client.search_model_versions(f"name = '{name}'")), key=int
        )
        raise UnknownModelVersionError(
            f"{name} has no version {version}; its versions are {', '.join(versions) or 'none'}"
        )
    return found


def find_version(client: MlflowClient, name: str, version: str) -> ModelVersionRef | None:
    if not version.isdigit():
        return None
    try:
        return _version_ref(client.get_model_version(name, version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def version_of(ref: ModelVersionRef | None) -> str | None:
    return None if ref is None else ref.version


def config_fingerprint(config: PipelineConfig) -> str:
    """sha256 of the resolved training config, to tell later whether a retrain would differ."""
    # Whether stages may be resumed, how often a run beats, whether undecodable images fail
    # the run or are left out (a model is only ever trained on the decodable ones), how the
    # paired gate decides, and whether stages train through the activation cache change
    # nothing a retrain produces.
    tree = config.model_dump(
        mode="json",
        exclude={
            "demo": True,
            "tracking": {"resume", "heartbeat_seconds"},
            "registry": {"gate", "alpha", "margin", "max_class_drop"},
            "data": {"on_bad_images"},
            "fine_tune": {"activation_cache_mb"},
            "compute": True,
        },
    )
    tree.update(config.compute.non_default())  # precision and XLA change the weights
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()
