"""Frozen-base features, computed once per (data, base, weights, size, pooling) and cached on disk."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.inference import forward_pass


@dataclass(frozen=True)
class FeatureKey:
    """Everything a frozen base's output depends on; any change means new features."""

    data_version: str
    architecture: str
    options: str
    weights_sha256: str
    image_size: int
    pooling: str

    def digest(self, frame: pd.DataFrame) -> str:
        """The cache key of one split: the key fields plus exactly which images, in which order."""
        content = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        content.update("\n".join(frame["path"]).encode())
        return content.hexdigest()[:32]


@dataclass(frozen=True)
class CachedFeatures:
    """One split's features and label ids on disk, and whether they were already there."""

    features: Path
    labels: Path
    reused: bool

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        return np.load(self.features), np.load(self.labels)


def weights_fingerprint(model) -> str:
    """sha256 of a model's weight values, so the key follows the weights, not a file name."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(weight.numpy())
        digest.update(weight.path.encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _save_atomically(path: Path, array: np.ndarray) -> None:
    # Concurrent runs may compute the same split; each writes a private file and renames it
    # into place, so readers see a whole file or none.
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy", delete=False) as handle:
        np.save(handle, array)
    os.replace(handle.name, path)


def cached_features(
    feature_extractor, dataset, frame: pd.DataFrame, key: FeatureKey, cache_dir: Path | None
) -> CachedFeatures:
    """Features of `frame`'s images from the cache, or computed with one forward pass and stored."""
    digest = key.digest(frame)
    root = cache_dir if cache_dir is not None else Path(tempfile.mkdtemp(prefix="features-"))
    root.mkdir(parents=True, exist_ok=True)
    features_path, labels_path = root / f"{digest}.features.npy", root / f"{digest}.labels.npy"
    if cache_dir is not None and features_path.is_file() and labels_path.is_file():
        return CachedFeatures(features_path, labels_path, reused=True)
    features, labels = forward_pass(feature_extractor, dataset, len(frame))
    _save_atomically(labels_path, labels)
    _save_atomically(features_path, np.asarray(features, dtype=np.float32))
    return CachedFeatures(features_path, labels_path, reused=False)


# --- Prefect steps -------------------------------------------------------------------------------


@task(name="extract-frozen-features", cache_policy=NO_CACHE)
def extract_frozen_features(
    classifier, table, loaded, data_version: str
) -> dict[str, CachedFeatures]:
    """Every split's features through the frozen base, reused from the cache when the key matches."""
    from tasks.data import image_dataset

    config = loaded.config
    key = FeatureKey(
        data_version=data_version,
        architecture=config.base.architecture,
        options=json.dumps(config.base.options, sort_keys=True),
        weights_sha256=weights_fingerprint(classifier.base),
        image_size=config.data.image_size,
        pooling=config.head.pooling,
    )
    cache_dir = (
        loaded.path(config.feature_extraction.cache_dir)
        if config.feature_extraction.cache_dir
        else None
    )
    features = {}
    for split in ("train", "val", "test"):
        frame = table.split(split)
        if frame.empty:
            continue
        dataset = image_dataset(
            frame, table.classes, config.data.image_size, config.data.batch_size
        )
        features[split] = cached_features(
            classifier.feature_extractor, dataset, frame, key, cache_dir
        )
    return features
