"""Features of a randomly initialised copy of a base: what the architecture alone gives, the
baseline a pretrained base's domain fit is judged against."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from conf.training import BaseModelConfig
from tasks.data.stream import image_dataset
from tasks.model.bases import build_base, preprocessing_layer
from tasks.model.classifier import initializers_seeded


def random_init_features(
    base: BaseModelConfig,
    pooling: str,
    image_size: int,
    seed: int,
    frame: pd.DataFrame,
    classes: tuple[str, ...],
    batch_size: int,
) -> np.ndarray:
    """Pooled features of `frame`'s images through `base`'s architecture with random weights
    (seeded), in float32, one row per image in order.

    BatchNormalization normalizes with each batch's own statistics. A fresh network's moving
    averages (mean 0, variance 1) leave its activations unscaled, and in MobileNet they fade
    layer by layer to 1e-16 at the last block: every feature the same, which would make any
    pretrained base look good. With the batch's statistics, each layer sees inputs of unit
    scale, as random-feature baselines are usually drawn.
    """
    with initializers_seeded(seed):
        network = build_base(base.architecture, None, image_size, base.options)
    network.trainable = True  # trainable BatchNormalization uses the batch's statistics
    pixels = keras.Input((image_size, image_size, 3), dtype="float32")
    x = network(preprocessing_layer(base.architecture)(pixels))
    pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPool2D
    model = keras.Model(pixels, pool()(x))
    step = tf.function(lambda images: model(images, training=True), reduce_retracing=True)
    batches = image_dataset(frame, classes, image_size, batch_size)
    return np.concatenate([step(images).numpy() for images, _ in batches])
