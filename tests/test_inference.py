"""Batched forward passes: outputs in dataset order, one trace per model, decoding kept out of the way."""

from __future__ import annotations

import gc
import os
import sys
import threading
import weakref
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from tasks.data.stream import image_dataset
from tasks.inference.forward import forward_pass, inference_step, low_priority_batches


def small_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    return keras.Model(inputs, keras.layers.Dense(4)(pooled))


def in_memory(n: int, batch: int = 4) -> tuple[np.ndarray, tf.data.Dataset]:
    images = np.random.default_rng(1).uniform(0, 255, (n, 8, 8, 3)).astype(np.float32)
    labels = np.arange(n, dtype=np.int32)
    return images, tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)


def test_outputs_and_labels_come_back_in_dataset_order() -> None:
    model = small_model()
    images, dataset = in_memory(10)  # the last batch is short
    outputs, labels = forward_pass(model, dataset, 10)
    np.testing.assert_allclose(outputs, model(images, training=False).numpy(), rtol=1e-5)
    assert labels.tolist() == list(range(10))


@pytest.mark.parametrize(
    ("count", "message"), [(9, "more than the 9 images"), (11, "yielded 10 images, 11 expected")]
)
def test_a_wrong_image_count_is_an_error(count: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        forward_pass(small_model(), in_memory(10)[1], count)


def test_an_empty_dataset_is_an_error() -> None:
    with pytest.raises(ValueError, match="no batches"):
        forward_pass(small_model(), in_memory(4)[1].take(0), 0)


def test_the_step_is_traced_once_per_model_and_does_not_keep_it_alive() -> None:
    model = small_model()
    spec = tf.TensorSpec((None, 8, 8, 3), tf.float32)
    step = inference_step(model, spec)
    assert inference_step(model, spec) is step
    forward_pass(model, in_memory(10, batch=3)[1], 10)  # batches of 3 and 1: one trace
    assert step.experimental_get_tracing_count() == 1
    assert inference_step(small_model(), spec) is not step  # another model, another step

    alive = weakref.ref(model)
    del model, step
    gc.collect()
    assert alive() is None


def nice_of(thread_id: str) -> int | None:
    """The thread's nice value, or None once it has exited (a joined thread can linger briefly)."""
    try:
        stat = Path(f"/proc/self/task/{thread_id}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[16])


@pytest.mark.skipif(
    sys.platform != "linux", reason="thread priorities are per thread on Linux only"
)
def test_decoding_threads_run_at_low_priority_and_the_caller_does_not(tmp_path: Path) -> None:
    paths = []
    for i in range(64):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((6, 6), i, np.uint8)).save(path)
        paths.append(str(path))
    frame = pd.DataFrame({"path": paths, "label": ["a"] * 64})
    dataset = image_dataset(frame, ("a",), 8, 8)  # a first TF call starts TF's own thread pools
    before = set(os.listdir("/proc/self/task"))
    batches = low_priority_batches(dataset)
    first = next(batches)
    started = {t: nice_of(t) for t in set(os.listdir("/proc/self/task")) - before}
    running = {t: nice for t, nice in started.items() if nice is not None}
    assert running and set(running.values()) == {19}, running
    assert nice_of(str(threading.get_native_id())) == 0
    rest = list(batches)
    pixels = [int(images[j, 0, 0, 0]) for images, _ in [first, *rest] for j in range(len(images))]
    assert pixels == list(range(64))  # every image, in order


def test_an_undecodable_first_image_raises_in_the_caller(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    frame = pd.DataFrame({"path": [str(broken)], "label": ["a"]})
    with pytest.raises(tf.errors.InvalidArgumentError):
        list(low_priority_batches(image_dataset(frame, ("a",), 8, 1)))


def test_an_empty_dataset_yields_nothing() -> None:
    assert list(low_priority_batches(in_memory(4)[1].take(0))) == []
