"""Fine-tuning at the cost of what is unfrozen: the frozen trunk's output, cached at the cut.

A stage that unfreezes the top N blocks leaves everything below them frozen and in inference
mode (BatchNorm frozen, no dropout below the cut), so the tensor entering the first unfrozen
block is a fixed function of the image. It is computed once per image, cached on disk like the
frozen features, and the stage trains and is evaluated through the unfrozen blocks and the head
alone. The layers are the classifier's own, so training the top trains the classifier.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from conf.data import DataConfig
from conf.training import BaseModelConfig
from tasks.data.stream import image_dataset
from tasks.inference.cached_pass import Wanted, cached_outputs
from tasks.inference.features import (
    CachedFeatures,
    FrozenBaseKey,
    picked_rows,
    weights_fingerprint,
)
from tasks.model.blocks import unfrozen_layer_names
from tasks.model.compute import layer_precision
from tasks.runtime.keras_internals import calls, is_own_call, producer

log = logging.getLogger(__name__)

# float32: the cached tensors are exactly what the whole model computes at that point, so a stage
# trained through the cache matches one trained through the whole model (tests/test_activations).
CACHE_DTYPE = np.float32


@dataclass(frozen=True)
class CutModels:
    """A classifier split where its frozen part ends.

    `trunk` maps pixels to the tensor entering the first unfrozen block; `top` maps that tensor
    to class probabilities through the unfrozen blocks, pooling and head, sharing their layers
    (and so their weights) with the classifier.
    """

    trunk: keras.Model
    top: keras.Model
    cut: str  # the name of the layer whose output is cached
    tensor: keras.KerasTensor  # that output, in the base's own graph
    precision: str = "float32"  # the classifier's; float16 values are cached as float32

    def bytes_per_image(self) -> int:
        return int(np.prod(self.trunk.output.shape[1:])) * np.dtype(CACHE_DTYPE).itemsize

    def shape(self) -> str:
        return "x".join(str(d) for d in self.trunk.output.shape[1:])


@dataclass(frozen=True)
class ActivationKey(FrozenBaseKey):
    """Everything the trunk's output depends on: the frozen base's key (its weights hash covers
    the trunk alone) plus where the trunk ends."""

    cut: str
    dtype: str
    precision: str = "float32"


def split_at_cut(classifier, trainable_layers: set[str] | None = None) -> CutModels | str:
    """The classifier split below its first trainable base layer, or why it cannot be.

    `trainable_layers` names the base layers that will train (default: those trainable now).
    The top part is every base layer that trains or computes from a layer that trains; the
    tensors it reads from the rest are what the frozen trunk hands it. Bases are divided into
    blocks where one tensor crosses from one block to the next, so that is one tensor.
    """
    base = classifier.base
    names = (
        {layer.name for layer in base.layers if layer.trainable}
        if trainable_layers is None
        else trainable_layers
    )
    trainable = {layer.name for layer in base.layers if layer.name in names and layer.weights}
    if not trainable:
        return "no base layer is trainable"
    top_part: set[str] = set()
    crossing: dict[int, keras.KerasTensor] = {}
    for operation in base.operations:  # topological order
        # Only the base's own call of each layer: every split adds calls of the same layers.
        inputs = [
            t
            for index, node in enumerate(calls(operation))
            if is_own_call(base, operation, index)
            for t in node.input_tensors
        ]
        producers = {producer(t)[0].name for t in inputs}
        if operation.name in trainable or producers & top_part:
            top_part.add(operation.name)
            for tensor in inputs:
                if producer(tensor)[0].name not in top_part:
                    crossing[id(tensor)] = tensor
    if len(crossing) != 1:
        return f"{len(crossing)} tensors cross from the frozen layers to the trainable ones"
    (cut,) = crossing.values()
    if producer(cut)[0] is base.layers[0]:
        return "the whole base is trainable: nothing below it is frozen"
    pixels = classifier.model.input
    preprocess = classifier.model.layers[1]
    # Built with the classifier's precision: compiling a mixed_float16 model scales its loss.
    with layer_precision(classifier.precision):
        trunk_base = keras.Model(base.input, cut, name="frozen_trunk")
        trunk = keras.Model(pixels, trunk_base(preprocess(pixels), training=False), name="trunk")
        top_base = keras.Model(cut, base.output, name="unfrozen_top")
        entering = keras.Input(cut.shape[1:], dtype=cut.dtype, name="trunk_output")
        pooled = classifier.feature_extractor.layers[-1](top_base(entering, training=False))
        top = keras.Model(entering, classifier.head(pooled), name="top")
    return CutModels(
        trunk=trunk,
        top=top,
        cut=producer(cut)[0].name,
        tensor=cut,
        precision=classifier.precision,
    )


def images_to_cache(table, train_pool: pd.DataFrame | None) -> int:
    """How many images a stage's activations cover: the training pool (a comparison's) or the
    training split, plus the validation and test splits."""
    train = train_pool if train_pool is not None else table.split("train")
    return len(train) + len(table.split("val")) + len(table.split("test"))


def cut_for_stage(classifier, stage, budget: float, images: int) -> CutModels | str:
    """Where `stage` (a FineTuneBlocks) trains through the activation cache, or why it trains
    through the whole model instead; `budget` is fine_tune.activation_cache_mb."""
    if budget == 0:
        return "fine_tune.activation_cache_mb is 0"
    if stage.augmentation.enabled:
        return "augmentation changes the images the frozen blocks see every epoch"
    names = unfrozen_layer_names(classifier.base, stage.settings.unfreeze_blocks)
    cut = split_at_cut(classifier, names)
    if isinstance(cut, str):
        return cut
    size_mb = cut.bytes_per_image() * images / 1e6
    if size_mb > budget:
        return (
            f"its activations at {cut.cut} ({cut.shape()}, {cut.bytes_per_image()} bytes an "
            f"image) would take {size_mb:.1f} MB for {images} images, over "
            f"fine_tune.activation_cache_mb ({budget:g})"
        )
    return cut


def features_and_cuts(classifier, cuts: list[CutModels]) -> keras.Model:
    """One model from pixels to the pooled features and then each cut's tensor, so a single
    forward pass fills the feature cache and the activation caches together."""
    base = classifier.base
    inner = keras.Model(base.input, [base.output, *(cut.tensor for cut in cuts)], name="base_cuts")
    pixels = classifier.model.input
    outputs = inner(classifier.model.layers[1](pixels), training=False)
    pooled = classifier.feature_extractor.layers[-1](outputs[0])
    return keras.Model(pixels, [pooled, *outputs[1:]], name="features_and_cuts")


def activation_key(
    cut: CutModels,
    base: BaseModelConfig,
    image_size: int,
    cache_dir: Path | None,
    data_version: str,
) -> Wanted:
    """What the cache stores a cut's activations under, and where: under `cache_dir` (the
    feature cache's folder), or nowhere when it is None."""
    key = ActivationKey(
        data_version=data_version,
        architecture=base.architecture,
        options=json.dumps(base.options, sort_keys=True),
        weights_sha256=weights_fingerprint(cut.trunk),
        image_size=image_size,
        cut=cut.cut,
        dtype=np.dtype(CACHE_DTYPE).name,
        precision=cut.precision,
    )
    return Wanted(key, cache_dir / "activations" if cache_dir else None, CACHE_DTYPE)


def cached_activations(
    cut: CutModels,
    table,
    base: BaseModelConfig,
    data: DataConfig,
    cache_dir: Path | None,
    data_version: str,
    train_pool: pd.DataFrame | None,
) -> dict[str, CachedFeatures]:
    """Each split's trunk output, from the cache or computed with one pass through the trunk.

    With `train_pool` (a comparison's), the pool's training images are one entry shared by its
    budgets and seeds, as for the frozen features.
    """
    wanted = activation_key(cut, base, data.image_size, cache_dir, data_version)
    cached = {}
    for split in ("train", "val", "test"):
        frame = table.split(split)
        if frame.empty:
            continue
        source = train_pool if split == "train" and train_pool is not None else frame
        dataset = image_dataset(source, table.classes, data.image_size, data.batch_size)
        (entry,) = cached_outputs(cut.trunk, dataset, source, [wanted], f"activations: {split}")
        cached[split] = entry if source is frame else picked_rows(entry, source, frame)
    return cached


def activation_dataset(cached: CachedFeatures, batch_size: int, shuffle_seed: int | None = None):
    """(trunk output, label) batches, shuffled the way the image batches would be.

    `tasks.data.stream.image_dataset` shuffles one element per image with the same buffer and seed, so
    both paths see the images in the same order in every epoch. Only indices go through tf.data:
    each batch's rows are read from the cache file, so memory holds a few batches, not the cache.
    """
    import tensorflow as tf

    activations, labels = cached.on_demand()
    labels = labels.astype(np.int32)
    indices = tf.data.Dataset.range(len(labels))
    if shuffle_seed is not None:
        indices = indices.shuffle(
            max(len(labels), 1), seed=shuffle_seed, reshuffle_each_iteration=True
        )

    def gather(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return activations.read(batch), labels[batch]

    shape = (None, *activations.row_shape)

    def lookup(batch):
        found, found_labels = tf.numpy_function(gather, [batch], (tf.float32, tf.int32))
        return tf.ensure_shape(found, shape), tf.ensure_shape(found_labels, (None,))

    return indices.batch(batch_size).map(lookup).prefetch(2), len(labels)
