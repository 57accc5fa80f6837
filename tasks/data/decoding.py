"""Image files to classifier input: the one decoding that training, batch prediction and serving share.

The registered serving model carries this module (and tasks/inference/forward.py) in its code, so it
imports nothing from the project but those and TensorFlow.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf


def decode_image(contents: tf.Tensor, image_size: int) -> tf.Tensor:
    """A PNG, JPEG, GIF or BMP file's bytes -> float32 RGB in [0, 255], image_size x image_size.

    Decoding to uint16 and dividing by 257 keeps 8-bit pixels exact and scales 16-bit ones down
    instead of truncating them. Shrinking is antialiased (averages large photos properly);
    enlarging is plain bilinear, which gives the same pixels as antialiased resizing there at a
    quarter of the cost.
    """
    import tensorflow as tf

    image = tf.io.decode_image(contents, channels=3, dtype=tf.uint16, expand_animations=False)
    image = tf.cast(image, tf.float32) / 257.0
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    shrinking = tf.logical_or(height > image_size, width > image_size)
    image = tf.cond(
        shrinking,
        lambda: tf.clip_by_value(
            tf.image.resize(image, (image_size, image_size), antialias=True), 0.0, 255.0
        ),
        lambda: tf.image.resize(image, (image_size, image_size)),
    )
    return tf.ensure_shape(image, (image_size, image_size, 3))


def image_batches(
    pairs: tf.data.Dataset, image_size: int, batch_size: int, *, files: bool
) -> tf.data.Dataset:
    """(file, label) pairs -> batches of (image, label); a file is a path when `files`, else its bytes.

    Parallelism is fixed (one decoder per core, two batches ahead) and tf.data's autotuner
    is off: in TensorFlow 2.21 its optimisation thread can hold up the end of an iteration for as
    long as its current period, which grows to 10 s. Any epoch or pass can end that way, and
    on 2 cores one pass in three took twice as long because of it.
    """
    import tensorflow as tf

    def decode(file: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        contents = tf.io.read_file(file) if files else file
        return decode_image(contents, image_size), label

    options = tf.data.Options()
    options.autotune.enabled = False
    return (
        pairs.map(decode, num_parallel_calls=os.cpu_count() or 1)
        .batch(batch_size)
        .prefetch(2)
        .with_options(options)
    )
