"""Compiled batched forward passes, without `model.predict`'s per-call overhead."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def forward_pass(model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Run `model` in inference mode over a dataset of (images, labels); return outputs and labels."""

    @tf.function(reduce_retracing=True)
    def step(images):
        return model(images, training=False)

    outputs, labels = [], []
    for images, batch_labels in dataset:
        outputs.append(step(images).numpy())
        labels.append(batch_labels.numpy())
    if not outputs:
        raise ValueError("the dataset yielded no batches")
    return np.concatenate(outputs), np.concatenate(labels)
