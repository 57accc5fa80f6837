"""The frozen-feature cache: one forward pass per key, reused after, recomputed when the key moves
or when a file of the entry is damaged."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tasks.inference.cached_pass import cached_features
from tasks.inference.features import (
    CacheDirError,
    FeatureKey,
    check_cache_dir,
    weights_fingerprint,
)

KEY = FeatureKey("data-v1", "Tiny", "{}", "w1", 8, "avg")


class CountingExtractor:
    """A real Keras feature extractor that counts the images it sees."""

    def __init__(self) -> None:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 3))
        self.model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs * 2.0))
        self.outputs = self.model.outputs  # what the cache reads the stored shape from
        self.images = 0

    def __call__(self, images, training=False):
        tf.py_function(self._count, [tf.shape(images)[0]], [])
        return self.model(images, training=training)

    def _count(self, n) -> None:
        self.images += int(n)


def dataset(n: int) -> tuple[tf.data.Dataset, pd.DataFrame]:
    images = np.arange(n * 8 * 8 * 3, dtype=np.float32).reshape(n, 8, 8, 3) % 255
    frame = pd.DataFrame({"path": [f"img{i}.png" for i in range(n)], "label": ["a"] * n})
    return tf.data.Dataset.from_tensor_slices((images, np.arange(n, dtype=np.int32) % 2)).batch(
        4
    ), frame


def test_second_call_reuses_the_cache_without_a_forward_pass(tmp_path: Path) -> None:
    extractor = CountingExtractor()
    data, frame = dataset(10)
    first = cached_features(extractor, data, frame, KEY, tmp_path)
    seen = extractor.images
    second = cached_features(extractor, data, frame, KEY, tmp_path)
    assert not first.reused and second.reused
    assert seen == 10 and extractor.images == 10  # no image went through the base again
    features, labels = second.load()
    assert features.shape == (10, 3) and labels.tolist() == [i % 2 for i in range(10)]
    np.testing.assert_allclose(features, first.load()[0])


@pytest.mark.parametrize(
    "changed",
    [
        {"data_version": "data-v2"},
        {"architecture": "Other"},
        {"weights_sha256": "w2"},
        {"image_size": 16},
        {"pooling": "max"},
        {"options": '{"alpha": 0.5}'},
        {"precision": "mixed_float16"},
    ],
)
def test_any_change_of_the_key_recomputes(tmp_path: Path, changed: dict) -> None:
    extractor = CountingExtractor()
    data, frame = dataset(6)
    cached_features(extractor, data, frame, KEY, tmp_path)
    again = cached_features(extractor, data, frame, replace(KEY, **changed), tmp_path)
    assert not again.reused and extractor.images == 12


def test_float32_entries_keep_the_names_they_had_before_precision_was_keyed() -> None:
    """A cache filled before compute.precision existed is still found by float32 runs."""
    _, frame = dataset(3)
    assert KEY.digest(frame) == "ffcd4c8f7eeef126271554d04dff5ee9"  # the digest commit 23f853a gave
    assert replace(KEY, precision="mixed_float16").digest(frame) != KEY.digest(frame)


def test_a_different_set_of_images_is_a_different_entry(tmp_path: Path) -> None:
    extractor = CountingExtractor()
    data, frame = dataset(6)
    cached_features(extractor, data, frame, KEY, tmp_path)
    other = frame.assign(path=frame["path"][::-1].to_numpy())
    assert not cached_features(extractor, data, other, KEY, tmp_path).reused


def test_concurrent_runs_sharing_the_cache_both_get_whole_files(tmp_path: Path) -> None:
    data, frame = dataset(40)
    results, errors = [], []

    def run() -> None:
        try:
            results.append(cached_features(CountingExtractor(), data, frame, KEY, tmp_path).load())
        except Exception as error:  # pragma: no cover - the assertion below reports it
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for features, labels in results:
        np.testing.assert_allclose(features, results[0][0])
        assert len(labels) == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no stray temp files
        f"{KEY.digest(frame)}.features.npy",
        f"{KEY.digest(frame)}.json",
        f"{KEY.digest(frame)}.labels.npy",
    ]


def test_weights_fingerprint_follows_the_values() -> None:
    layer_model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    before = weights_fingerprint(layer_model)
    assert weights_fingerprint(layer_model) == before
    kernel = layer_model.layers[0].kernel
    kernel.assign(kernel.numpy() + 1.0)
    assert weights_fingerprint(layer_model) != before


# --- damaged entries heal ------------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def flip_last_byte(path: Path) -> None:
    """Same size, one bit pattern changed inside the data: only the checksum notices."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def replace_header(path: Path) -> None:
    """Garbage where numpy's header was, same size: a changed checksum, and numpy cannot read it."""
    data = bytearray(path.read_bytes())
    data[:16] = b"x" * 16
    path.write_bytes(bytes(data))


def recorded_garbage(path: Path) -> None:
    """Bytes numpy cannot read, with a record that matches them: a writer that wrote nonsense."""
    path.write_bytes(b"not an array at all")
    record_path = path.with_name(path.name.split(".")[0] + ".json")
    record = json.loads(record_path.read_text())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    record[path.name] = {"size": path.stat().st_size, "sha256": digest}
    record_path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("damaged", "damage", "problem"),
    [
        ("features.npy", truncate, "bytes long where"),
        ("features.npy", flip_last_byte, "sha256 differs"),
        ("labels.npy", truncate, "bytes long where"),
        ("labels.npy", replace_header, "sha256 differs"),
        ("features.npy", recorded_garbage, "unreadable by numpy"),
        ("json", Path.unlink, "missing"),
        ("json", lambda path: path.write_text("{not json"), "unreadable"),
    ],
    ids=[
        "truncated-features",
        "flipped-byte",
        "truncated-labels",
        "bad-header",
        "unreadable",
        "no-record",
        "bad-record",
    ],
)
def test_a_damaged_entry_is_recomputed_with_a_warning_naming_the_file(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damaged: str,
    damage: Callable[[Path], object],
    problem: str,
) -> None:
    extractor = CountingExtractor()
    data, frame = dataset(10)
    first = cached_features(extractor, data, frame, KEY, tmp_path)
    original = first.load()
    bad = tmp_path / f"{KEY.digest(frame)}.{damaged}"
    size = bad.stat().st_size
    damage(bad)

    with caplog.at_level(logging.WARNING, logger="tasks.inference.features"):
        healed = cached_features(extractor, data, frame, KEY, tmp_path)

    assert not healed.reused and extractor.images == 20  # one more forward pass
    (warning,) = [r for r in caplog.records if r.name == "tasks.inference.features"]
    assert warning.levelno == logging.WARNING
    assert str(bad) in warning.getMessage() and problem in warning.getMessage()
    assert "recomputing" in warning.getMessage()
    features, labels = healed.load()
    np.testing.assert_array_equal(features, original[0])
    np.testing.assert_array_equal(labels, original[1])
    if damage is not recorded_garbage and bad.suffix == ".npy":
        assert bad.stat().st_size == size
    again = cached_features(extractor, data, frame, KEY, tmp_path)
    assert again.reused and extractor.images == 20  # healthy: reused without a warning
    assert len([r for r in caplog.records if r.name == "tasks.inference.features"]) == 1


def test_an_intact_entry_is_reused_silently(tmp_path: Path, caplog) -> None:
    extractor = CountingExtractor()
    data, frame = dataset(4)
    cached_features(extractor, data, frame, KEY, tmp_path)
    with caplog.at_level(logging.WARNING):
        assert cached_features(extractor, data, frame, KEY, tmp_path).reused
    assert not [r for r in caplog.records if r.name == "tasks.inference.features"]


# --- permissions and the folder ------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o007, 0o660)])
def test_cache_files_get_the_permissions_the_umask_allows(
    tmp_path: Path, umask: int, mode: int
) -> None:
    data, frame = dataset(4)
    saved = os.umask(umask)
    try:
        cached_features(CountingExtractor(), data, frame, KEY, tmp_path)
    finally:
        os.umask(saved)
    modes = {path.name.split(".", 1)[1]: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
    assert modes == {"features.npy": mode, "labels.npy": mode, "json": mode}


def test_check_cache_dir_creates_the_folder(tmp_path: Path) -> None:
    check_cache_dir(tmp_path / "a" / "cache")
    assert (tmp_path / "a" / "cache").is_dir()
    assert list((tmp_path / "a" / "cache").iterdir()) == []  # the probe file is gone


def test_check_cache_dir_names_the_key_the_path_and_the_reason(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # fails for root too, unlike a read-only folder
    with pytest.raises(CacheDirError) as caught:
        check_cache_dir(blocker / "cache")
    message = str(caught.value)
    assert "feature_extraction.cache_dir" in message and str(blocker / "cache") in message
    assert "Not a directory" in message and "null" in message
    assert isinstance(caught.value, OSError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_cache_dir_refuses_a_read_only_folder(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(CacheDirError, match="Permission denied"):
            check_cache_dir(locked)
    finally:
        locked.chmod(0o700)


def test_rows_read_on_demand_are_the_stored_rows(tmp_path: Path) -> None:
    """Fine-tuning reads its cached activations a batch of rows at a time, in shuffled order."""
    from tasks.inference.features import StoredRows

    stored = np.random.default_rng(0).random((50, 3, 4), dtype=np.float32)
    np.save(tmp_path / "rows.npy", stored)
    rows = StoredRows.of(tmp_path / "rows.npy")
    assert len(rows) == 50
    assert np.array_equal(rows.read(np.array([5, 0, 49, 7])), stored[[5, 0, 49, 7]])
    picked = StoredRows.of(tmp_path / "rows.npy", np.array([10, 20, 30]))
    assert len(picked) == 3
    assert np.array_equal(picked.read(np.array([2, 0])), stored[[30, 10]])


def test_a_pass_removes_what_a_killed_pass_left_but_not_what_one_is_writing(
    tmp_path: Path,
) -> None:
    """A pass killed mid-way leaves its partial file; the next pass in that folder removes it
    once nothing has written to it for 10 minutes, and leaves a live writer's file alone."""
    abandoned = tmp_path / ".partial-killed.npy"
    abandoned.write_bytes(b"\0" * 4096)
    an_hour_ago = time.time() - 3600
    os.utime(abandoned, (an_hour_ago, an_hour_ago))
    being_written = tmp_path / ".partial-live.npy"
    being_written.write_bytes(b"\0" * 4096)
    data, frame = dataset(6)
    cached_features(CountingExtractor(), data, frame, KEY, tmp_path)
    assert not abandoned.exists()
    assert being_written.exists()
    assert not [p for p in tmp_path.glob(".partial-*") if p != being_written]
