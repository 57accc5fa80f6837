"""Compiled batched forward passes, without `model.predict`'s per-call overhead."""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow as tf
from tqdm import tqdm

# One traced step per model and input spec. Tracing MobileNet takes about 0.5 s, and the flow runs
# the same extractor over three splits. The step holds the model weakly, so it dies with the model.
_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inference_step(model, image_spec: tf.TensorSpec):
    """`model(images, training=False)` compiled once for any batch size of `image_spec` images."""
    by_spec = _steps.setdefault(model, {})
    key = (tuple(image_spec.shape[1:]), image_spec.dtype)
    if key not in by_spec:
        held = weakref.proxy(model)
        signature = [tf.TensorSpec((None, *image_spec.shape[1:]), image_spec.dtype)]

        @tf.function(input_signature=signature)
        def step(images):
            return held(images, training=False)

        by_spec[key] = step
    return by_spec[key]


def forward_pass(
    model, dataset: tf.data.Dataset, count: int, label: str = "forward pass"
) -> tuple[np.ndarray, np.ndarray]:
    """Run `model` in inference mode over `count` images of (images, labels) batches.

    Outputs go straight into one preallocated array, so a pass holds its result once. On a
    terminal, a pass that lasts shows a progress bar named `label`.
    """
    outputs, labels, filled = None, np.empty(count, np.int32), 0
    for (batch,), batch_labels in forward_batches(model, dataset, count, label):
        if outputs is None:
            outputs = np.empty((count, *batch.shape[1:]), batch.dtype)
        outputs[filled : filled + len(batch)] = batch
        labels[filled : filled + len(batch)] = batch_labels
        filled += len(batch)
    if outputs is None:
        raise ValueError("the dataset yielded no batches")
    return outputs, labels


def forward_batches(
    model, dataset: tf.data.Dataset, count: int, label: str = "forward pass"
) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
    """Each batch's outputs (a list: one array per output of `model`) and labels, in order.

    Raises once the dataset yields more or fewer than `count` images, so a caller that stores
    the batches as they come never keeps a short or overlong pass.
    """
    step = inference_step(model, dataset.element_spec[0])
    filled = 0
    with progress_bar(count, label) as bar:
        for images, batch_labels in low_priority_batches(dataset):
            found = step(images)
            batch = (
                [t.numpy() for t in found] if isinstance(found, (list, tuple)) else [found.numpy()]
            )
            filled += len(batch[0])
            if filled > count:
                raise ValueError(f"the dataset yielded more than the {count} images expected")
            yield batch, batch_labels.numpy()
            bar.update(len(batch[0]))
    if filled != count:
        raise ValueError(f"the dataset yielded {filled} images, {count} expected")


def progress_bar(count: int, label: str) -> tqdm:
    """A bar of `count` images on a terminal; none where stderr is not one (tests, CI, log files).

    It appears only once a pass has lasted 2 s, so short passes leave no trace, and it is
    erased when the pass ends.
    """
    return tqdm(
        total=count,
        desc=label,
        unit="img",
        leave=False,
        delay=2,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
    )


def low_priority_batches(dataset: tf.data.Dataset) -> Iterator:
    """Iterate `dataset` with its reading and decoding threads at the lowest CPU priority.

    tf.data starts those threads with the iterator, and on Linux a new thread inherits the nice
    value of the thread that starts it. At low priority, decoding fills the gaps the forward pass
    leaves instead of pre-empting one of its threads, which stalls the other one too: on 2 cores
    extraction went from about 0.89 to 0.93 of the bare forward pass. Only this helper thread and
    the dataset's own threads are lowered. Elsewhere the priority is per process, so nothing
    changes there.
    """
    if sys.platform != "linux":
        yield from dataset
        return

    def start() -> tuple[Iterator, object]:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        iterator = iter(dataset)
        return iterator, next(iterator, None)  # the first batch starts every worker thread

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="start-decoding") as pool:
        iterator, first = pool.submit(start).result()
    if first is not None:
        yield first
        yield from iterator
