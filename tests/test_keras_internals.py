"""The private Keras pieces of tasks/runtime/keras_internals.py still behave as the pipeline relies on.

A Keras upgrade that moves or changes one of them fails here, by name, rather than as a silent
change in which weights load, where the dataset is read from, or which seeds a random base gets.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from random import Random

import keras
import numpy as np
import pytest

from tasks.runtime.keras_internals import (
    calls,
    file_matches_hash,
    initializer_seeds_drawn_from,
    is_own_call,
    producer,
    weights_fetched_through,
)

ROOT = Path(__file__).resolve().parents[1]


class _Asked(Exception):
    pass


def test_applications_fetch_their_weights_through_the_replacement() -> None:
    asked: list[tuple[str, str]] = []

    def get_file(fname=None, origin=None, *args, **kwargs):
        asked.append((str(fname), kwargs.get("cache_subdir", "")))
        raise _Asked

    with weights_fetched_through(get_file), pytest.raises(_Asked):
        keras.applications.MobileNet(
            include_top=False, weights="imagenet", alpha=0.25, input_shape=(32, 32, 3)
        )
    assert asked == [("mobilenet_2_5_224_tf_no_top.h5", "models")]


def test_the_real_get_file_is_back_afterwards() -> None:
    from keras.src.utils import file_utils

    with weights_fetched_through(lambda *args, **kwargs: None):
        assert file_utils.get_file is not keras.utils.get_file
    assert file_utils.get_file is keras.utils.get_file


def test_a_file_matches_its_sha256_or_md5_and_not_another_hash(tmp_path: Path) -> None:
    path = tmp_path / "weights.h5"
    path.write_bytes(b"not really weights")
    data = path.read_bytes()
    assert file_matches_hash(str(path), hashlib.sha256(data).hexdigest())
    assert file_matches_hash(str(path), hashlib.md5(data).hexdigest())
    assert not file_matches_hash(str(path), hashlib.sha256(b"other bytes").hexdigest())


def test_keras_home_is_where_the_dataset_loader_reads(tmp_path: Path) -> None:
    """Fixed when keras is imported: a KERAS_HOME set afterwards changes neither."""
    home = tmp_path / "home"
    later = tmp_path / "later"
    script = textwrap.dedent(
        f"""
        import gzip, os
        import numpy as np
        import keras
        from tasks.runtime.keras_internals import keras_home

        os.environ["KERAS_HOME"] = {str(later)!r}
        folder = os.path.join(keras_home(), "datasets", "fashion-mnist")
        os.makedirs(folder)
        for split, label in (("train", 3), ("t10k", 7)):
            with gzip.open(os.path.join(folder, split + "-labels-idx1-ubyte.gz"), "wb") as f:
                f.write(bytes(8) + bytes([label]))
            with gzip.open(os.path.join(folder, split + "-images-idx3-ubyte.gz"), "wb") as f:
                f.write(bytes(16) + bytes([label]) * 784)
        (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
        print(keras_home(), y_train.tolist(), y_test.tolist(), int(x_test.max()))
        """
    )
    env = {**os.environ, "KERAS_HOME": str(home), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == f"{home} [3] [7] 7"
    assert not later.exists()


def test_own_calls_are_the_models_and_later_calls_are_not() -> None:
    inputs = keras.Input((3,))
    dense = keras.layers.Dense(2)
    model = keras.Model(inputs, dense(inputs))
    dense(keras.Input((3,)))  # a second call, as a split of the model makes

    assert is_own_call(model, dense, 0)
    assert not is_own_call(model, dense, 1)


def test_a_tensor_names_the_call_that_made_it_and_the_call_its_inputs() -> None:
    """The graph walks (memory planning, the activation cache's cut) follow tensors back to the
    layer call that made them, and from a call to the tensors it took."""
    inputs = keras.Input((3,))
    first, second = keras.layers.Dense(4, name="first"), keras.layers.Dense(2, name="second")
    hidden = first(inputs)
    model = keras.Model(inputs, second(hidden))
    second(keras.Input((4,)))  # a later call: the model's own stays the first

    operation, index = producer(model.output)
    assert (operation, index) == (second, 0)
    call = calls(second)[index]
    assert call.input_tensors == [hidden] and call.output_tensors == [model.output]
    assert producer(call.input_tensors[0]) == (first, 0)
    assert len(calls(second)) == 2
    (entry,) = calls(producer(inputs)[0])
    assert entry.is_input and not calls(first)[0].is_input


def _unseeded_kernel() -> np.ndarray:
    layer = keras.layers.Dense(4)
    layer.build((None, 3))
    return keras.ops.convert_to_numpy(layer.kernel)


def test_unseeded_initializers_draw_from_the_given_generator() -> None:
    with initializer_seeds_drawn_from(Random(5)):
        first = _unseeded_kernel()
    random.random()  # what another thread drawing from Python's random does
    with initializer_seeds_drawn_from(Random(5)):
        again = _unseeded_kernel()
    with initializer_seeds_drawn_from(Random(6)):
        other = _unseeded_kernel()

    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
