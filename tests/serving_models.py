"""Registered serving models for the tests: a tiny Keras classifier, logged and wrapped as the pipeline does."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import mlflow
import mlflow.tensorflow
from mlflow import MlflowClient

from tasks.model.classifier import build_classifier
from tasks.registry.serving import log_serving_model
from tasks.registry.versions import ModelVersionRef, register_challenger
from tasks.runtime.tracking_server import using_tracking_uri
from tasks.tracking.runs import ensure_experiment
from tasks.tracking.stage_runs import model_requirements


def tiny_classifier(classes: list[str], size: int) -> keras.Model:
    """The pipeline's classifier on a one-convolution base, raw pixels in.

    A randomly initialised MobileNet's features vanish (about 1e-17), so every image would get
    exactly 1/len(classes) and no assertion on labels could fail.
    """
    conv = keras.layers.Conv2D(
        8, 3, activation="relu", kernel_initializer=keras.initializers.RandomNormal(0.0, 1.0, 0)
    )
    base = keras.Sequential([keras.Input((size, size, 3)), conv], name="tiny_base")
    return build_classifier(base, "MobileNet", len(classes), "avg", 0.0, 0, seed=0).model


def log_keras_model(uri: str, name: str, model: keras.Model, folder: Path) -> tuple[str, str]:
    """Log `model` with the tensorflow flavor, as each stage is logged; (run id, model URI)."""
    experiment = ensure_experiment(uri, name, folder)
    run_id = MlflowClient(uri).create_run(experiment).info.run_id
    with using_tracking_uri(uri), mlflow.start_run(run_id=run_id):
        info = mlflow.tensorflow.log_model(
            model, name="model", pip_requirements=model_requirements()
        )
    return run_id, info.model_uri


def register_serving_model(
    uri: str, name: str, model: keras.Model, classes: list[str], example: Path, folder: Path
) -> tuple[str, ModelVersionRef]:
    """Log `model`, wrap it for serving and register that, as the training flow does."""
    run_id, keras_uri = log_keras_model(uri, name, model, folder)
    serving_uri = log_serving_model(uri, run_id, keras_uri, classes, example)
    tags = {"classes": json.dumps(list(classes))}
    return run_id, register_challenger(uri, serving_uri, name, run_id, tags)
