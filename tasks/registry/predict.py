"""Batch prediction: a registered serving model, loaded as an MLflow pyfunc, labels a folder of images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf import project_root
from conf.errors import ExpectedError
from tasks.data.errors import DataNotFoundError
from tasks.data.table import (
    EmptyDatasetError,
    UndecodableImagesError,
    find_undecodable_images,
    images_under,
)
from tasks.registry.serving_model import IMAGE_COLUMN, LABEL_COLUMN, PROBABILITY_COLUMN
from tasks.registry.versions import ModelVersionRef, load_pyfunc, registered_version
from tasks.runtime.credentials import redact_url
from tasks.runtime.tracking_server import check_tracking_server, tracking_uri, using_tracking_uri


class ServingModelError(ExpectedError, ValueError):
    """The model URI does not name a loadable image classifier."""


@dataclass(frozen=True)
class ServingModel:
    """A serving model (tasks/registry/serving.py) loaded as a pyfunc, with the version it came from."""

    model_uri: str
    version: ModelVersionRef | None
    pyfunc: Any

    def describe(self) -> str:
        if self.version is None:
            return self.model_uri
        return f"{self.version.name} version {self.version.version} ({self.model_uri})"


@dataclass(frozen=True)
class PredictionResult:
    """Where the predictions went, how many there are, and which model made them."""

    output: Path
    count: int
    model: str
    label_counts: dict[str, int]


def list_images(folder: str | Path) -> list[str]:
    """Every .png, .jpg and .jpeg under `folder` (recursively), after checking each one decodes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataNotFoundError(f"{folder} is not a folder; point --images at a folder of images")
    paths = images_under(folder)
    if not paths:
        raise EmptyDatasetError(f"no images (.png, .jpg, .jpeg) under {folder}")
    bad = find_undecodable_images(paths)
    if bad:
        raise UndecodableImagesError(bad)
    return paths


def default_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else the store of the project that holds the current directory."""
    return tracking_uri(project_root("conf/default.yaml"))


def resolve_version(uri: str, model_uri: str) -> ModelVersionRef | None:
    """The registered version a `models:/NAME/N` or `models:/NAME@alias` URI points to now.

    None for URIs that name no registered version (`runs:/...`, a logged model's `models:/m-...`).
    """
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    if not model_uri.startswith("models:/"):
        return None
    try:
        found = get_model_name_and_version(MlflowClient(uri), model_uri)
    except MlflowException as exc:
        raise ServingModelError(
            f"{model_uri} does not resolve to a registered model version in {redact_url(uri)}: {exc.message}"
        ) from exc
    if len(found) == 1:
        return None
    version = registered_version(uri, *found)
    if version is None:
        raise ServingModelError(
            f"{model_uri}: {found[0]} has no version {found[1]} in {redact_url(uri)}"
        )
    return version


def load_serving_model(model_uri: str, uri: str) -> ServingModel:
    """Load the model as a pyfunc, after checking it takes image files.

    An alias is resolved once and the version it names is loaded, so the whole run uses one
    version even if the alias moves meanwhile.
    """
    check_tracking_server(uri)
    version = resolve_version(uri, model_uri)
    with using_tracking_uri(uri):  # models:/ URIs resolve against the tracking store's registry
        pyfunc = load_pyfunc(version.uri if version else model_uri)
    schema = pyfunc.metadata.get_input_schema()
    if schema is None or schema.input_names() != [IMAGE_COLUMN]:
        raise ServingModelError(
            f"{model_uri} does not take image files (its input is {schema}): it was registered "
            "before the pipeline registered serving models. Train again (transferflow train) "
            "to register one, and let the gate promote it."
        )
    return ServingModel(model_uri, version, pyfunc)


def predict_images(model: ServingModel, paths: list[str], batch_size: int) -> pd.DataFrame:
    """Each image's most probable class and its probability, as the served model answers them.

    The files go to the model as they are, so it decodes them exactly as `mlflow models serve`
    does for a request.
    """
    answers = []
    for start in range(0, len(paths), batch_size):
        files = [Path(path).read_bytes() for path in paths[start : start + batch_size]]
        answers.append(model.pyfunc.predict(pd.DataFrame({IMAGE_COLUMN: files})))
    answered = pd.concat(answers, ignore_index=True)
    return pd.DataFrame(
        {
            "path": paths,
            "label": answered[LABEL_COLUMN],
            "probability": answered[PROBABILITY_COLUMN],
        }
    )


def write_predictions(predictions: pd.DataFrame, output: str | Path) -> Path:
    """Write the predictions as CSV (path,label,probability); returns the file's path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    predictions.to_csv(output, index=False, float_format="%.6f")
    return output


# --- Prefect steps -------------------------------------------------------------------------------


@task(name="list-images", cache_policy=NO_CACHE)
def list_images_step(images: str) -> list[str]:
    """Find the images to label and check they all decode, before loading any model."""
    return list_images(images)


@task(name="load-serving-model", cache_policy=NO_CACHE)
def load_serving_model_step(model_uri: str, uri: str | None) -> ServingModel:
    """Load the model as a pyfunc from `uri`, else MLFLOW_TRACKING_URI or the project's store."""
    return load_serving_model(model_uri, uri or default_tracking_uri())


@task(name="predict-images", cache_policy=NO_CACHE)
def predict_images_step(model: ServingModel, paths: list[str], batch_size: int) -> pd.DataFrame:
    return predict_images(model, paths, batch_size)


@task(name="write-predictions", cache_policy=NO_CACHE)
def write_predictions_step(
    predictions: pd.DataFrame, output: str, model: ServingModel
) -> PredictionResult:
    """Write the CSV and summarise it: rows, labels, and the model version that made them."""
    path = write_predictions(predictions, output)
    counts = predictions["label"].value_counts().sort_index()
    return PredictionResult(
        path, len(predictions), model.describe(), {str(k): int(v) for k, v in counts.items()}
    )
