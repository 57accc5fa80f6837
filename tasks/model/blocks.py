"""The base's blocks, told apart by Keras Applications' layer names, and which layers train."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import keras
import numpy as np

from conf.errors import ExpectedError
from tasks.model.bases import construct_base
from tasks.runtime.keras_internals import calls, producer


class UnfreezeTooDeepError(ExpectedError, ValueError):
    """A fine-tuning stage unfreezes more blocks than the base has."""


@dataclass(frozen=True)
class Block:
    """Consecutive base layers that are unfrozen together."""

    name: str
    layer_names: tuple[str, ...]


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
    base = construct_base(architecture, None, image_size, dict(options))
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
