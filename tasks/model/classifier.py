"""The classifier assembled: raw pixels, the base's own preprocessing, the frozen base, a new head.

Everything here is plain Keras: the saved model takes raw RGB pixels in [0, 255] and loads back
with `keras.saving.load_model` in safe mode, with no custom objects.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Literal

import keras
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.training import BaseModelConfig, ComputeConfig, HeadConfig
from tasks.model.bases import build_base, preprocessing_layer
from tasks.model.compute import MIXED_FLOAT16, device_description, layer_precision
from tasks.runtime.keras_internals import initializer_seeds_drawn_from
from tasks.runtime.run_log import run_logger


@dataclass(frozen=True)
class Classifier:
    """A classifier and the parts of it the pipeline trains separately.

    `head` holds the same layer objects as the top of `model`, so training `head` on cached
    features trains `model`; `feature_extractor` shares the preprocessing, base and pooling.
    """

    model: keras.Model
    feature_extractor: keras.Model
    head: keras.Model
    base: keras.Model

    @property
    def precision(self) -> str:
        """The Keras dtype policy its layers were built with: "float32" or "mixed_float16"."""
        return str(self.base.dtype_policy.name)


# --- the classifier ------------------------------------------------------------------------------


def build_classifier(
    base: keras.Model,
    architecture: str,
    num_classes: int,
    pooling: Literal["avg", "max"],
    dropout: float,
    hidden_units: int,
    seed: int,
) -> Classifier:
    """Raw pixels -> the family's preprocessing -> base (inference mode) -> pooling -> new head.

    The new layers take the base's precision. The softmax always computes in float32, so the
    probabilities and the loss do too; under mixed_float16, Keras scales the loss of a model
    built this way when it is compiled.
    """
    if num_classes < 2:
        raise ValueError(f"A classifier needs at least 2 classes, got {num_classes}.")
    if pooling not in ("avg", "max"):
        raise ValueError(f"head.pooling must be 'avg' or 'max', got {pooling!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"head.dropout must be in [0, 1), got {dropout}.")
    if hidden_units < 0:
        raise ValueError(f"head.hidden_units must be 0 or more, got {hidden_units}.")
    height, width, channels = base.input_shape[1:]
    if channels != 3 or height is None or width is None:
        raise ValueError(
            f"The base must take fixed-size RGB images, but {base.name} takes {base.input_shape}."
        )

    with layer_precision(str(base.dtype_policy.name)):
        pixels = keras.Input((height, width, 3), dtype="float32", name="pixels")
        x = preprocessing_layer(architecture)(pixels)
        # Keras records training=False here, but in Keras 3 an outer call with training=True (fit)
        # overrides it; BatchNormalization stays in inference mode because it is never trainable.
        x = base(x, training=False)
        pool = (
            keras.layers.GlobalAveragePooling2D
            if pooling == "avg"
            else keras.layers.GlobalMaxPool2D
        )
        features = pool(name=f"{pooling}_pool")(x)

        head_input = keras.Input((features.shape[-1],), dtype="float32", name="features")
        h = keras.layers.Dropout(dropout, seed=seed, name="head_dropout")(head_input)
        if hidden_units:
            h = keras.layers.Dense(
                hidden_units,
                activation="relu",
                kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
                name="head_hidden",
            )(h)
        probabilities = keras.layers.Dense(
            num_classes,
            activation="softmax",
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1),
            name="predictions",
            dtype="float32",  # float16 probabilities would round small ones to 0 in the loss
        )(h)
        head = keras.Model(head_input, probabilities, name="head")

        model = keras.Model(pixels, head(features), name=f"{architecture}_classifier")
        feature_extractor = keras.Model(pixels, features, name=f"{architecture}_features")
        return Classifier(model=model, feature_extractor=feature_extractor, head=head, base=base)


@contextmanager
def initializers_seeded(seed: int) -> Iterator[None]:
    """Layers built inside draw the seeds of their unseeded initializers from a generator of
    their own, started at `seed`.

    Keras draws each such seed from Python's global `random`, which the process's other threads
    (Prefect's, MLflow's) draw from too: a random base (`base.weights: null`) built right after
    `keras.utils.set_random_seed` could still differ from one run of the same seed to the next.
    """
    with initializer_seeds_drawn_from(Random(seed)):
        yield


# --- Prefect steps -------------------------------------------------------------------------------


@task(name="build-classifier", cache_policy=NO_CACHE)
def build_classifier_for(
    base_config: BaseModelConfig,
    head: HeadConfig,
    compute: ComputeConfig,
    image_size: int,
    seed: int,
    project: Path,
    num_classes: int,
) -> Classifier:
    """The frozen base with the configured weights, and a new head for `num_classes` classes.

    A weights file named relative to the project is found under `project`.
    """
    weights = base_config.weights
    if weights not in (None, "imagenet"):
        weights = str((project / weights).resolve())
    keras.utils.set_random_seed(seed)
    with initializers_seeded(seed):
        base = build_base(
            base_config.architecture,
            weights,
            image_size,
            base_config.options,
            precision=compute.precision,
        )
    if compute.precision == MIXED_FLOAT16 and device_description() == "CPU":
        run_logger().warning(
            "compute.precision is mixed_float16 but TensorFlow sees no GPU: training runs in "
            "float16 on the CPU, usually slower than float32."
        )
    return build_classifier(
        base,
        base_config.architecture,
        num_classes,
        pooling=head.pooling,
        dropout=head.dropout,
        hidden_units=head.hidden_units,
        seed=seed,
    )
