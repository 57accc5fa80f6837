"""BatchNorm statistics measured on a batch of images, for a network trained from random weights."""

from __future__ import annotations

import keras


def measure_batch_norm_statistics(model: keras.Model, images) -> None:
    """Set every trainable BatchNorm layer's moving mean and variance to those of `images`.

    One forward pass in training mode with the momentum at 0 makes each layer keep exactly the
    statistics of its input for this batch; frozen (pretrained) BatchNorm layers do not change.
    """
    layers = [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        model(images, training=True)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
