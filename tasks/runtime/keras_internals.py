"""The private Keras pieces the pipeline depends on, where Keras 3 has no public API for them.

Each is a `keras.src` name that a Keras release may move or change without notice;
tests/test_keras_internals.py fails on the day one of them does, naming which.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from random import Random
from typing import Any

import keras
from keras.src.backend.config import keras_home as _keras_home
from keras.src.ops.function import make_node_key
from keras.src.random import seed_generator
from keras.src.utils import file_utils


@contextmanager
def weights_fetched_through(get_file: Callable[..., Any]) -> Iterator[None]:
    """Inside, Keras Applications constructors call `get_file` to fetch their weights.

    They call `file_utils.get_file` through the module at run time; the public
    `keras.utils.get_file` is the same function, but replacing that name changes nothing for them.
    """
    real = file_utils.get_file
    file_utils.get_file = get_file
    try:
        yield
    finally:
        file_utils.get_file = real


def file_matches_hash(path: str, file_hash: str) -> bool:
    """Whether `path` has the sha256 or md5 `file_hash`, by the rule `keras.utils.get_file` applies."""
    return bool(file_utils.validate_file(path, file_hash))


def keras_home() -> str:
    """The Keras home folder as Keras fixed it when imported ($KERAS_HOME, else ~/.keras or /tmp)."""
    return str(_keras_home())


def producer(tensor: Any) -> tuple[Any, int]:
    """The operation (layer) whose call made the symbolic `tensor`, and which of its calls."""
    operation, node_index, _ = tensor._keras_history
    return operation, node_index


def calls(operation: Any) -> list[Any]:
    """Each call of `operation` in functional graphs, in order: its `input_tensors`,
    `output_tensors`, and `is_input` for an Input's own node."""
    return list(operation._inbound_nodes)


def is_own_call(model: keras.Model, operation: Any, node_index: int) -> bool:
    """Whether the `node_index`-th call of `operation` is one of `model`'s own graph.

    A layer called again outside the model (to build a second model from part of it) gains
    nodes that belong to that other model.
    """
    return make_node_key(operation, node_index) in model._nodes


@contextmanager
def initializer_seeds_drawn_from(generator: Random) -> Iterator[None]:
    """Inside, initializers built without a seed draw it from `generator`, not Python's `random`."""
    shared = seed_generator.python_random
    seed_generator.python_random = generator
    try:
        yield
    finally:
        seed_generator.python_random = shared
