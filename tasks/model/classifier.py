"""The classifier: a frozen Keras Applications base, its own preprocessing, a new head.

Everything here is plain Keras: the saved model takes raw RGB pixels in [0, 255] and loads back
with `keras.saving.load_model` in safe mode, with no custom objects.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from random import Random
from types import ModuleType
from typing import Any, Literal

import keras
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.errors import ExpectedError
from tasks.model.compute import MIXED_FLOAT16, device_description, layer_precision
from tasks.runtime.keras_internals import (
    calls,
    file_matches_hash,
    initializer_seeds_drawn_from,
    producer,
    weights_fetched_through,
)

APPLICATIONS_DOCS = "https://keras.io/api/applications/"

# Constructor arguments the pipeline sets itself; a value in base.options would silently break
# the classifier (a second pooling, a top, or inputs the preprocessing layer does not expect).
_RESERVED_OPTIONS = {
    "include_top": "the classifier adds its own head",
    "weights": "set base.weights instead",
    "input_shape": "set data.image_size instead",
    "input_tensor": "the classifier creates the input",
    "pooling": "set head.pooling instead",
    "classes": "the number of classes comes from the data",
    "classifier_activation": "the classifier adds its own head",
    "include_preprocessing": (
        "the classifier feeds raw pixels and relies on the model's built-in normalisation"
    ),
}


class UnknownArchitectureError(ExpectedError, ValueError):
    """base.architecture names no Keras Applications model."""


class WeightsNotFoundError(ExpectedError, FileNotFoundError):
    """The weights file for the base is neither where it was looked for nor downloadable."""


class BaseOptionsError(ExpectedError, ValueError):
    """base.options or data.image_size that the architecture's constructor rejects."""


class UnfreezeTooDeepError(ExpectedError, ValueError):
    """A fine-tuning stage unfreezes more blocks than the base has."""


class PreprocessingNotAffineError(ExpectedError, ValueError):
    """A family's preprocess_input is not per-pixel affine, so a Dense layer cannot hold it."""


@dataclass(frozen=True)
class Block:
    """Consecutive base layers that are unfrozen together."""

    name: str
    layer_names: tuple[str, ...]


@dataclass(frozen=True)
class Classifier:
    """A classifier and the parts of it the pipeline trains separately.

    `head` holds the same layer objects as the top of `model`, so training `head` on cached
    features trains `model`; `feature_extractor` shares the preprocessing, base and pooling.
    """

    model: keras.Model
    feature_extractor: keras.Model
    head: keras.Model
    base: keras.Model

    @property
    def precision(self) -> str:
        """The Keras dtype policy its layers were built with: "float32" or "mixed_float16"."""
        return str(self.base.dtype_policy.name)


# --- architectures -------------------------------------------------------------------------------


def architecture_names() -> list[str]:
    """Every Keras Applications constructor name usable as a base, e.g. "MobileNetV2"."""
    return [
        name
        for name in dir(keras.applications)
        if name[:1].isupper()
        and callable(getattr(keras.applications, name))
        and isinstance(
            getattr(keras.applications, _family_name(getattr(keras.applications, name)), None),
            ModuleType,
        )
    ]


def _family_name(constructor: Any) -> str:
    """The name of the module that defines `constructor`, e.g. ResNet50 -> "resnet"; the public
    keras.applications module of that name holds its preprocess_input."""
    return getattr(constructor, "__module__", "").rpartition(".")[2]


def check_architecture(name: str) -> None:
    """Raise UnknownArchitectureError unless `name` is a Keras Applications constructor."""
    names = architecture_names()
    if name in names:
        return
    close = [n for n in names if n.lower() == name.lower()]
    close += [n for n in difflib.get_close_matches(name, names, n=3, cutoff=0.6) if n not in close]
    hint = f" Did you mean {' or '.join(repr(n) for n in close)}?" if close else ""
    raise UnknownArchitectureError(
        f"base.architecture {name!r} is not a Keras Applications model.{hint} "
        f"The full list is keras.applications ({APPLICATIONS_DOCS}); "
        f"this Keras has {len(names)} of them."
    )


def _constructor(architecture: str) -> Callable[..., keras.Model]:
    check_architecture(architecture)
    return getattr(keras.applications, architecture)


def _family(architecture: str) -> ModuleType:
    """The public keras.applications module of an architecture, e.g. ResNet50 -> resnet."""
    return getattr(keras.applications, _family_name(_constructor(architecture)))


# --- weights -------------------------------------------------------------------------------------


def keras_cache_dir() -> Path:
    """Where Keras keeps downloads ($KERAS_HOME, default ~/.keras), read now, not at import.

    Keras itself reads KERAS_HOME once, when keras is imported, so a KERAS_HOME set later
    (a test, a flow parameter) would otherwise be ignored.
    """
    home = os.environ.get("KERAS_HOME")
    if home:
        return Path(home).expanduser().absolute()
    base = Path.home() if os.access(Path.home(), os.W_OK) else Path("/tmp")
    return base / ".keras"


class _WeightsFileRequest(Exception):
    """What a Keras Applications constructor asked get_file for; raised to stop the build there."""

    def __init__(self, fname: str, origin: str, file_hash: str | None, cache_subdir: str):
        super().__init__(fname)
        self.fname = fname
        self.origin = origin
        self.file_hash = file_hash
        self.cache_subdir = cache_subdir


_intercept_lock = threading.Lock()


@contextmanager
def _stop_at_weights_download() -> Iterator[None]:
    """Make this thread's Keras weight fetches raise _WeightsFileRequest instead of downloading.

    The file name of ImageNet weights depends on the architecture and its options (MobileNet's
    alpha and input size, ...); asking the constructor itself avoids copying Keras' naming rules.
    Other threads keep the real get_file.
    """
    real_get_file = keras.utils.get_file
    owner = threading.get_ident()

    def get_file(fname: Any = None, origin: Any = None, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != owner:
            return real_get_file(fname, origin, *args, **kwargs)
        name = str(fname) if fname else os.path.basename(str(origin).split("?")[0])
        raise _WeightsFileRequest(
            fname=name,
            origin=str(origin),
            file_hash=kwargs.get("file_hash") or kwargs.get("md5_hash"),
            cache_subdir=kwargs.get("cache_subdir", "datasets"),
        )

    with _intercept_lock, weights_fetched_through(get_file):
        yield


# What each base's constructor asked get_file for, and the weights files whose hash was checked
# (by path, size and modification time): building a base only to learn its file name took 0.8 s,
# in every cell a comparison worker trained.
_weights_requests: dict[tuple[str, int, str], _WeightsFileRequest] = {}
_checked_weights: set[tuple[str, int, int]] = set()


def _weights_request(architecture: str, image_size: int, options: dict[str, Any]):
    key = (architecture, image_size, repr(sorted(options.items())))
    if key not in _weights_requests:
        with _stop_at_weights_download():
            try:
                _construct(architecture, "imagenet", image_size, options)
            except _WeightsFileRequest as request:
                _weights_requests[key] = request
            else:  # pragma: no cover - a Keras that no longer fetches through get_file
                raise RuntimeError(
                    f"keras.applications.{architecture} did not ask for a weights file; "
                    "tasks.model.classifier cannot locate its ImageNet weights in this Keras version"
                ) from None
    return _weights_requests[key]


def _imagenet_weights_file(architecture: str, image_size: int, options: dict[str, Any]) -> Path:
    """The local ImageNet weights file for this base, downloaded into the cache when online."""
    wanted = _weights_request(architecture, image_size, options)
    folder = keras_cache_dir() / wanted.cache_subdir
    path = folder / wanted.fname
    if path.is_file():
        stat = path.stat()
        seen = (str(path), stat.st_size, stat.st_mtime_ns)
        if wanted.file_hash and seen not in _checked_weights:
            if not file_matches_hash(str(path), wanted.file_hash):
                raise WeightsNotFoundError(
                    f"{path} is not the genuine ImageNet weights file of {architecture} (its "
                    f"hash differs from {wanted.file_hash}). Replace it with the file from "
                    f"{wanted.origin}."
                )
            _checked_weights.add(seen)
        return path
    try:
        downloaded = keras.utils.get_file(
            wanted.fname,
            wanted.origin,
            cache_subdir=wanted.cache_subdir,
            file_hash=wanted.file_hash,
            cache_dir=str(keras_cache_dir()),
        )
    except Exception as error:
        raise WeightsNotFoundError(
            f"ImageNet weights for {architecture} (options {options or {}}, image size "
            f"{image_size}) are not at {path}, and downloading them from {wanted.origin} failed "
            f"({error}). Copy {wanted.fname} into {folder}/ ($KERAS_HOME/models/, default "
            "~/.keras/models/), or set base.weights to the path of a weights file."
        ) from error
    return Path(downloaded)


def resolve_weights(
    architecture: str,
    weights: str | None,
    options: dict[str, Any] | None,
    image_size: int = 224,
) -> str | None:
    """What to pass as `weights=` to the constructor: None, or an absolute path to a weights file.

    "imagenet" is resolved to the file in $KERAS_HOME/models/ as read at call time (downloaded
    there when online, WeightsNotFoundError naming it when not), so an offline run fails fast
    with the path to stage instead of a URL error. The ImageNet file name depends on the options
    and, for MobileNet, on image_size.
    """
    if weights is None:
        return None
    if weights == "imagenet":
        return str(_imagenet_weights_file(architecture, image_size, options or {}))
    path = Path(weights).expanduser().absolute()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"base.weights {weights!r}: there is no file at {path}. Set base.weights to the "
            "path of a weights file of this architecture, to 'imagenet' (looked for in "
            f"{keras_cache_dir() / 'models'}/, or downloaded when online), or to null."
        )
    return str(path)


def _check_options(architecture: str, options: dict[str, Any]) -> None:
    for key in options:
        if key in _RESERVED_OPTIONS:
            raise BaseOptionsError(
                f"base.options may not set {key!r} for {architecture}: {_RESERVED_OPTIONS[key]}."
            )
    accepted = set(inspect.signature(_constructor(architecture)).parameters) - set(
        _RESERVED_OPTIONS
    )
    for key in sorted(set(options) - accepted):
        close = difflib.get_close_matches(key, sorted(accepted), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BaseOptionsError(
            f"base.options {key!r}: keras.applications.{architecture} takes no such argument."
            f"{hint} It takes: {', '.join(sorted(accepted)) or 'nothing else'}."
        )


def _construct(
    architecture: str, weights: str | None, image_size: int, options: dict[str, Any]
) -> keras.Model:
    _check_options(architecture, options)
    try:
        return _constructor(architecture)(
            include_top=False,
            weights=weights,
            input_shape=(image_size, image_size, 3),
            **options,
        )
    except ValueError as error:
        minimum = re.search(r"at least (\d+)x(\d+)", str(error))
        if minimum:
            raise BaseOptionsError(
                f"data.image_size {image_size} is too small for {architecture}: set "
                f"data.image_size to at least {minimum.group(1)}."
            ) from error
        raise BaseOptionsError(
            f"keras.applications.{architecture} rejected base.options {options} with "
            f"base.weights {weights!r}: {error}"
        ) from error


def build_base(
    architecture: str,
    weights: str | None,
    image_size: int,
    options: dict[str, Any] | None = None,
    precision: str = "float32",
) -> keras.Model:
    """The Keras Applications base without its top, for square RGB images, frozen.

    Its layers compute in `precision` (compute.precision); the weights stay float32 either way.
    """
    options = dict(options or {})
    resolved = resolve_weights(architecture, weights, options, image_size)
    with layer_precision(precision):
        base = _construct(architecture, resolved, image_size, options)
    base.trainable = False
    return base


# --- preprocessing -------------------------------------------------------------------------------


def preprocessing_layer(architecture: str) -> keras.layers.Layer:
    """The family's own preprocess_input as a frozen Dense(3) over the channel axis.

    Every Keras Applications preprocess_input ("tf", "torch", "caffe" modes, or identity where
    the model normalises inside) is a per-pixel affine map of the three channels, so a plain
    Dense layer reproduces it exactly: the saved model then takes raw [0, 255] pixels and needs
    no Lambda or custom class to load in another process. The map is measured by probing the
    real function, so it follows Keras if a family's constants change.
    """
    family = _family(architecture)
    family_name = family.__name__.rsplit(".", 1)[-1]

    def preprocess(pixels: np.ndarray) -> np.ndarray:
        # preprocess_input works in place on float arrays: always hand it a copy.
        batch = np.array(pixels, dtype="float32").reshape(1, 1, -1, 3)
        out = keras.ops.convert_to_numpy(family.preprocess_input(batch))
        return np.asarray(out, dtype="float64").reshape(-1, 3)

    probes = np.vstack([np.zeros((1, 3)), 255.0 * np.eye(3)])
    responses = preprocess(probes)
    bias = responses[0]
    kernel = (responses[1:] - bias) / 255.0  # row i: the effect of input channel i

    pixels = np.random.default_rng(0).uniform(0.0, 255.0, size=(256, 3))
    expected = preprocess(pixels)
    if not np.allclose(pixels @ kernel + bias, expected, rtol=1e-5, atol=1e-3):
        worst = float(np.max(np.abs(pixels @ kernel + bias - expected)))
        raise PreprocessingNotAffineError(
            f"keras.applications.{family_name}.preprocess_input is not a per-pixel affine map "
            f"(off by up to {worst:.3g}), so it cannot be baked into the model as a Dense layer; "
            f"choose another base.architecture than {architecture}."
        )

    layer = keras.layers.Dense(3, name=f"preprocess_{family_name}", dtype="float32")
    layer.build((None, 3))
    layer.set_weights([kernel.astype("float32"), bias.astype("float32")])
    layer.trainable = False
    return layer


# --- blocks and unfreezing -----------------------------------------------------------------------


@dataclass(frozen=True)
class _BlockNaming:
    """How one Keras Applications family names the layers of its blocks."""

    families: str
    pattern: re.Pattern[str]
    # "cut": blocks end where one tensor crosses, unnamed layers join the block they sit in.
    # "cell": NASNet cells take the two previous cells' outputs, so no single-tensor cut exists
    # between them; unnamed layers join the cell of the layer they feed.
    strategy: Literal["cut", "cell"] = "cut"


_BLOCK_NAMINGS = (
    _BlockNaming("MobileNet", re.compile(r"^(conv)_(?:dw|pw|pad)_(\d+)")),
    _BlockNaming("MobileNetV2", re.compile(r"^(block_\d+|expanded_conv)_")),
    _BlockNaming("MobileNetV3", re.compile(r"^(expanded_conv(?:_\d+)?)_[a-z]")),
    _BlockNaming("ResNet, ResNetV2, DenseNet", re.compile(r"^(conv\d+_block\d+)_")),
    _BlockNaming("InceptionV3", re.compile(r"^(mixed\d+)$")),
    _BlockNaming("InceptionResNetV2", re.compile(r"^(mixed_\d[a-z]|block(?:35|17|8)_\d+)(?:_|$)")),
    _BlockNaming("VGG, Xception, EfficientNet, EfficientNetV2", re.compile(r"^(block\d+[a-z]?)_")),
    _BlockNaming("ConvNeXt", re.compile(r"_(stage_\d+_block_\d+)_")),
    _BlockNaming(
        "NASNet",
        re.compile(
            r"^(stem)_(?:conv|bn)\d$"
            r"|^(?:adjust|normal|reduction|separable_conv)_\w*?_((?:stem|reduce)_\d+|\d+)$"
        ),
        strategy="cell",
    ),
)


def _block_key(naming: _BlockNaming, name: str) -> str | None:
    match = naming.pattern.search(name)
    if not match:
        return None
    key = "_".join(group for group in match.groups() if group)
    return f"cell_{key}" if key.isdigit() else key


@dataclass(frozen=True)
class _Graph:
    """The base's operations in topological order, and where each tensor is made and last used."""

    operations: list[Any]
    spans: list[tuple[int, int]]  # (producer position, last consumer position) per tensor
    consumers: list[list[int]]  # positions of the operations each operation feeds


def _graph(model: keras.Model) -> _Graph:
    operations = list(model.operations)
    position = {id(op): i for i, op in enumerate(operations)}
    produced: dict[int, int] = {}
    last_use: dict[int, int] = {}
    consumers: list[set[int]] = [set() for _ in operations]
    inputs = {id(t) for t in model.inputs}
    pending = list(model.outputs)
    seen: set[int] = set()
    while pending:
        tensor = pending.pop()
        operation, node_index = producer(tensor)
        node = calls(operation)[node_index]
        if id(node) in seen:
            continue
        seen.add(id(node))
        here = position[id(operation)]
        for out in node.output_tensors:
            produced[id(out)] = here
        if node.is_input or id(tensor) in inputs:
            continue
        for source in node.input_tensors:
            last_use[id(source)] = max(last_use.get(id(source), -1), here)
            source_op, _ = producer(source)
            consumers[position[id(source_op)]].add(here)
            pending.append(source)
    for out in model.outputs:
        last_use[id(out)] = len(operations)
    spans = [(produced[t], last_use[t]) for t in produced if t in last_use]
    return _Graph(operations, spans, [sorted(c) for c in consumers])


def _single_tensor_cuts(graph: _Graph) -> list[int]:
    """Positions after which exactly one tensor is still needed: the seams between blocks."""
    crossing = np.zeros(len(graph.operations) + 1, dtype=int)
    for made, used in graph.spans:
        crossing[made] += 1
        crossing[used] -= 1
    live = np.cumsum(crossing)
    return [i for i in range(len(graph.operations)) if live[i] == 1]


def _blocks_by_cuts(graph: _Graph, keys: list[str | None]) -> list[tuple[list[str], list[int]]]:
    groups: list[tuple[list[str], list[int]]] = []  # (block keys, operation positions)
    start = 0
    for cut in [*_single_tensor_cuts(graph), len(graph.operations) - 1]:
        if cut < start:
            continue
        segment = list(range(start, cut + 1))
        start = cut + 1
        segment_keys = list(dict.fromkeys(k for i in segment if (k := keys[i]) is not None))
        if groups and (not segment_keys or segment_keys[0] == groups[-1][0][-1]):
            # Unnamed pieces (stem layers, transitions, the top) join the block before them.
            block_keys, members = groups[-1]
            block_keys.extend(k for k in segment_keys if k not in block_keys)
            members.extend(segment)
        else:
            groups.append((segment_keys or ["stem"], segment))
    return groups


def _blocks_by_cells(graph: _Graph, keys: list[str | None]) -> list[tuple[list[str], list[int]]]:
    resolved = list(keys)
    for i in reversed(range(len(resolved))):
        if resolved[i] is None:
            fed = [resolved[c] for c in graph.consumers[i] if resolved[c] is not None]
            resolved[i] = fed[0] if fed else None
    order: dict[str, list[int]] = {}
    trailing: list[int] = []
    for i, key in enumerate(resolved):
        if key is None:
            trailing.append(i)
        else:
            order.setdefault(key, []).append(i)
    groups = [([key], members) for key, members in order.items()]
    if trailing:
        groups[-1][1].extend(trailing)
    return groups


def base_blocks(base: keras.Model) -> list[Block]:
    """The base's layers grouped into blocks, input to output, so unfreezing never splits one.

    A block is named by Keras Applications' layer naming (conv5_block3, block_16, mixed10, ...)
    and bounded where a single tensor crosses from one block to the next, so layers Keras left
    unnamed (shortcut convolutions, activations, adds) stay with the block they belong to and a
    residual block is never half trainable. Layers before the first named block form "stem";
    layers after the last one (Conv_1, top_conv, post_bn, ...) join the last block. A block
    with no weights joins its neighbour, so every extra block unfrozen trains more parameters.
    """
    names = [op.name for op in base.operations]
    keys_by_naming = [[_block_key(naming, name) for name in names] for naming in _BLOCK_NAMINGS]
    # The family is the naming that explains the most layers; ties (MobileNetV2's pattern also
    # matches MobileNetV3's "expanded_conv" layers) go to the one that tells more blocks apart.
    best = max(
        range(len(_BLOCK_NAMINGS)),
        key=lambda i: (sum(k is not None for k in keys_by_naming[i]), len(set(keys_by_naming[i]))),
    )
    naming, keys = _BLOCK_NAMINGS[best], keys_by_naming[best]
    graph = _graph(base)
    if not any(keys):
        # Not a Keras Applications naming: every single-tensor seam is a block boundary.
        own_names: list[str | None] = list(names)
        groups = [([names[s[-1]]], s) for _, s in _blocks_by_cuts(graph, own_names)]
    elif naming.strategy == "cell":
        groups = _blocks_by_cells(graph, keys)
    else:
        groups = _blocks_by_cuts(graph, keys)
    # A block with nothing to train (VGG's "stem" is just the input) would make one more
    # unfrozen block change nothing: it joins the next block (the one before, at the top).
    while len(groups) > 1 and (
        empty := next((g for g in groups if not _has_weights(graph, g[1])), None)
    ):
        at = groups.index(empty)
        neighbour = groups[at + 1] if at + 1 < len(groups) else groups[at - 1]
        neighbour[1].extend(empty[1])
        groups.remove(empty)
    blocks = []
    for block_keys, positions in groups:
        layer_names = tuple(
            names[i] for i in sorted(positions) if isinstance(graph.operations[i], keras.Layer)
        )
        name = block_keys[0] if len(block_keys) == 1 else f"{block_keys[0]}..{block_keys[-1]}"
        blocks.append(Block(name=name, layer_names=layer_names))
    return blocks


def _has_weights(graph: _Graph, positions: list[int]) -> bool:
    return any(getattr(graph.operations[i], "weights", None) for i in positions)


def base_block_count(architecture: str, image_size: int, options: dict[str, Any]) -> int:
    """How many blocks `unfreeze_blocks` can count on this base, from a randomly initialised copy.

    Weights change no layer, so the copy needs no weights file. Keras' session is cleared after
    it, so the base built for training gets the layer names it would get without this copy.
    """
    base = _construct(architecture, None, image_size, dict(options))
    count = len(base_blocks(base))
    del base
    keras.backend.clear_session(free_memory=False)
    return count


def check_unfreeze_depths(
    depths: list[int | Literal["all"]], blocks: int, architecture: str
) -> None:
    """Raise UnfreezeTooDeepError naming the first `fine_tune.stages[i]` deeper than the base."""
    for index, depth in enumerate(depths):
        if isinstance(depth, int) and depth > blocks:
            raise UnfreezeTooDeepError(
                f"fine_tune.stages[{index}].unfreeze_blocks is {depth}, but {architecture} has "
                f"{blocks} blocks (stem included): use at most {blocks}, or 'all'."
            )


def trainable_parameter_count(model: keras.Model) -> int:
    """Scalar parameters that the next fit() will update."""
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def unfreeze_top_blocks(base: keras.Model, blocks: int | Literal["all"]) -> int:
    """Make the top `blocks` blocks of the base trainable; return its trainable parameter count.

    BatchNormalization layers stay frozen everywhere: updating their statistics from small
    fine-tuning batches wrecks the pretrained features (the classifier also calls the base with
    training=False, so frozen BN layers run in inference mode).
    """
    trainable = unfrozen_layer_names(base, blocks)
    base.trainable = True
    for layer in base.layers:
        layer.trainable = layer.name in trainable
        for sub in layer._flatten_layers(include_self=True, recursive=True):
            if isinstance(sub, keras.layers.BatchNormalization):
                sub.trainable = False
    return trainable_parameter_count(base)


def unfrozen_layer_names(base: keras.Model, blocks: int | Literal["all"]) -> set[str]:
    """The names of the layers `unfreeze_top_blocks(base, blocks)` makes trainable, BatchNorm
    layers aside, without changing the base."""
    all_blocks = base_blocks(base)
    if blocks == "all":
        chosen = all_blocks
    elif isinstance(blocks, int) and not isinstance(blocks, bool) and blocks >= 0:
        if blocks > len(all_blocks):
            raise ValueError(
                f"Cannot unfreeze the top {blocks} blocks of {base.name}: it has "
                f"{len(all_blocks)} blocks (stem included). Use at most {len(all_blocks)}, "
                "or 'all'."
            )
        chosen = all_blocks[len(all_blocks) - blocks :]
    else:
        raise ValueError(f"unfreeze_blocks must be a non-negative integer or 'all', got {blocks!r}")
    batch_norm = {
        layer.name for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)
    }
    return {name for block in chosen for name in block.layer_names} - batch_norm


def make_fully_trainable(base: keras.Model) -> int:
    """Make every layer of the base trainable, BatchNormalization included; return the count.

    For training from random weights: there are no pretrained statistics to protect, and a deep
    network without working batch normalisation barely trains. A trainable Keras 3 BatchNorm
    uses batch statistics under fit even though the classifier calls the base with training=False.
    """
    base.trainable = True
    for layer in base._flatten_layers(include_self=False, recursive=True):
        layer.trainable = True
    return trainable_parameter_count(base)


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


# --- the classifier ------------------------------------------------------------------------------


def build_classifier(
    base: keras.Model,
    architecture: str,
    num_classes: int,
    pooling: Literal["avg", "max"],
    dropout: float,
    hidden_units: int,
    seed: int,
) -> Classifier:
    """Raw pixels -> the family's preprocessing -> base (inference mode) -> pooling -> new head.

    The new layers take the base's precision. The softmax always computes in float32, so the
    probabilities and the loss do too; under mixed_float16, Keras scales the loss of a model
    built this way when it is compiled.
    """
    if num_classes < 2:
        raise ValueError(f"A classifier needs at least 2 classes, got {num_classes}.")
    if pooling not in ("avg", "max"):
        raise ValueError(f"head.pooling must be 'avg' or 'max', got {pooling!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"head.dropout must be in [0, 1), got {dropout}.")
    if hidden_units < 0:
        raise ValueError(f"head.hidden_units must be 0 or more, got {hidden_units}.")
    height, width, channels = base.input_shape[1:]
    if channels != 3 or height is None or width is None:
        raise ValueError(
            f"The base must take fixed-size RGB images, but {base.name} takes {base.input_shape}."
        )

    with layer_precision(str(base.dtype_policy.name)):
        pixels = keras.Input((height, width, 3), dtype="float32", name="pixels")
        x = preprocessing_layer(architecture)(pixels)
        # Keras records training=False here, but in Keras 3 an outer call with training=True (fit)
        # overrides it; BatchNormalization stays in inference mode because it is never trainable.
        x = base(x, training=False)
        pool = (
            keras.layers.GlobalAveragePooling2D
            if pooling == "avg"
            else keras.layers.GlobalMaxPool2D
        )
        features = pool(name=f"{pooling}_pool")(x)

        head_input = keras.Input((features.shape[-1],), dtype="float32", name="features")
        h = keras.layers.Dropout(dropout, seed=seed, name="head_dropout")(head_input)
        if hidden_units:
            h = keras.layers.Dense(
                hidden_units,
                activation="relu",
                kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
                name="head_hidden",
            )(h)
        probabilities = keras.layers.Dense(
            num_classes,
            activation="softmax",
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1),
            name="predictions",
            dtype="float32",  # float16 probabilities would round small ones to 0 in the loss
        )(h)
        head = keras.Model(head_input, probabilities, name="head")

        model = keras.Model(pixels, head(features), name=f"{architecture}_classifier")
        feature_extractor = keras.Model(pixels, features, name=f"{architecture}_features")
        return Classifier(model=model, feature_extractor=feature_extractor, head=head, base=base)


@contextmanager
def initializers_seeded(seed: int) -> Iterator[None]:
    """Layers built inside draw the seeds of their unseeded initializers from a generator of
    their own, started at `seed`.

    Keras draws each such seed from Python's global `random`, which the process's other threads
    (Prefect's, MLflow's) draw from too: a random base (`base.weights: null`) built right after
    `keras.utils.set_random_seed` could still differ from one run of the same seed to the next.
    """
    with initializer_seeds_drawn_from(Random(seed)):
        yield


# --- Prefect steps -------------------------------------------------------------------------------


@task(name="build-classifier", cache_policy=NO_CACHE)
def build_classifier_for(loaded, num_classes: int) -> Classifier:
    """The frozen base with the configured weights, and a new head for `num_classes` classes."""
    config = loaded.config
    weights = config.base.weights
    if weights not in (None, "imagenet"):
        weights = str(loaded.path(weights))  # a weights file named relative to the project
    keras.utils.set_random_seed(config.seed)
    with initializers_seeded(config.seed):
        base = build_base(
            config.base.architecture,
            weights,
            config.data.image_size,
            config.base.options,
            precision=config.compute.precision,
        )
    if config.compute.precision == MIXED_FLOAT16 and device_description() == "CPU":
        from tasks.runtime.run_log import run_logger

        run_logger().warning(
            "compute.precision is mixed_float16 but TensorFlow sees no GPU: training runs in "
            "float16 on the CPU, usually slower than float32."
        )
    return build_classifier(
        base,
        config.base.architecture,
        num_classes,
        pooling=config.head.pooling,
        dropout=config.head.dropout,
        hidden_units=config.head.hidden_units,
        seed=config.seed,
    )
