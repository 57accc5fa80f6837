"""Batches of decoded images and labels streamed from an image table's rows with tf.data."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import tensorflow as tf

from tasks.data.decoding import image_batches
from tasks.data.table import class_indices


def image_dataset(
    frame: pd.DataFrame,
    classes: Sequence[str],
    image_size: int,
    batch_size: int,
    shuffle_seed: int | None = None,
    augment: Callable | None = None,
) -> tf.data.Dataset:
    """Batches of (float32 RGB images in [0, 255] of image_size x image_size, int32 labels).

    Files are read and decoded on the fly (tasks/data/decoding.py), so memory holds only a few
    batches. Only paths are shuffled (a full shuffle is then cheap), reshuffled each epoch.
    `augment`, a Keras layer, changes each batch at random (training=True): new changes every epoch.
    """
    paths = tf.constant(frame["path"].tolist(), dtype=tf.string)
    labels = tf.constant(class_indices(frame, tuple(classes)), dtype=tf.int32)
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(
            max(len(frame), 1), seed=shuffle_seed, reshuffle_each_iteration=True
        )
    batches = image_batches(dataset, image_size, batch_size, files=True)
    if augment is None:
        return batches
    return batches.map(lambda images, labels: (augment(images, training=True), labels)).prefetch(2)
