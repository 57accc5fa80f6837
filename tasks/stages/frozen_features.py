"""The feature pass before the stages: every split's frozen features, and the cached activations
of the fine-tuning stages to come, in one pass through the base."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.data import DataConfig
from conf.training import BaseModelConfig
from tasks.data.stream import image_dataset
from tasks.inference.activations import (
    CutModels,
    activation_key,
    cut_for_stage,
    features_and_cuts,
    images_to_cache,
)
from tasks.inference.cached_pass import Wanted, cached_outputs
from tasks.inference.features import (
    CachedFeatures,
    FeatureKey,
    picked_rows,
    weights_fingerprint,
)
from tasks.stages.fine_tune import FineTuneBlocks


def cuts_ahead(
    classifier, budget: float, table, train_pool: pd.DataFrame | None, stages: Sequence
) -> list[CutModels]:
    """The cuts of `stages` (the fine-tuning stages after the feature pass, this strategy's and
    other strategies' on the same frozen base) that will train through the cache, within
    `budget` MB (fine_tune.activation_cache_mb).

    The feature pass computes them with the features: it runs the whole base anyway, so they
    cost only their writing, where each stage would otherwise run its trunk over every image.
    """
    images = images_to_cache(table, train_pool)
    cuts: dict[str, CutModels] = {}
    for stage in stages:
        if isinstance(stage, FineTuneBlocks):
            cut = cut_for_stage(classifier, stage, budget, images)
            if not isinstance(cut, str):
                cuts.setdefault(cut.cut, cut)
    return list(cuts.values())


@task(name="extract-frozen-features", cache_policy=NO_CACHE)
def extract_frozen_features(
    classifier,
    table,
    base: BaseModelConfig,
    pooling: str,
    data: DataConfig,
    cache_dir: Path | None,
    data_version: str,
    train_pool: pd.DataFrame | None = None,
    cuts: Sequence = (),
) -> dict[str, CachedFeatures]:
    """Every split's features through the frozen base, reused from the cache when the key matches.

    The cache is the folder `cache_dir` (none when None). With `train_pool` (rows of the table's
    frame, a superset of its training split) the whole pool's features are cached as one entry
    and the training split's rows are picked from it, so every label budget and seed of a
    comparison reads the same entry. `cuts` (CutModels of the fine-tuning stages to come) have
    their activations cached by the same pass.
    """
    key = FeatureKey(
        data_version=data_version,
        architecture=base.architecture,
        options=json.dumps(base.options, sort_keys=True),
        weights_sha256=weights_fingerprint(classifier.base),
        image_size=data.image_size,
        pooling=pooling,
        precision=classifier.precision,
    )
    wanted = [Wanted(key, cache_dir)]
    wanted += [activation_key(cut, base, data.image_size, cache_dir, data_version) for cut in cuts]
    model = features_and_cuts(classifier, list(cuts)) if cuts else classifier.feature_extractor
    features = {}
    for split in ("train", "val", "test"):
        frame = table.split(split)
        if frame.empty:
            continue
        source = train_pool if split == "train" and train_pool is not None else frame
        dataset = image_dataset(source, table.classes, data.image_size, data.batch_size)
        cached = cached_outputs(model, dataset, source, wanted, f"features: {split}")[0]
        features[split] = cached if source is frame else picked_rows(cached, source, frame)
    return features
