"""Where and how TensorFlow computes: the device training runs on, and the layers' precision."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

DEVICE_TAG = "device"
MIXED_FLOAT16 = "mixed_float16"


def device_description() -> str:
    """The device TensorFlow places training on, as a run tag: "GPU:0 (NVIDIA H200)" or "CPU".

    Without a distribution strategy TensorFlow trains on the first GPU alone, so a machine
    with more says how many it has.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU"
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name")
    first = f"GPU:0 ({name})" if name else "GPU:0"
    return first if len(gpus) == 1 else f"{first}, one of {len(gpus)} GPUs"


@contextmanager
def layer_precision(precision: str) -> Iterator[None]:
    """Layers created inside take `precision` as their Keras dtype policy; the policy in force
    before comes back after.

    Keras reads its global policy when a layer is created. Left set, it would reach every model
    built later in the thread: the next flow of a long-lived worker, the next test.
    """
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
