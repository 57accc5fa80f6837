"""The forward pass behind the frozen-output cache: what is missing computed at once and stored."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from tasks.inference.features import (
    CachedFeatures,
    CacheEntry,
    CacheKey,
    process_umask,
    store_entry,
    whole_entry,
)
from tasks.inference.forward import forward_batches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wanted:
    """One output of a forward pass to cache: its key, the folder of its entries (None: a
    temporary one, nothing reused) and the dtype it is stored in."""

    key: CacheKey
    root: Path | None
    dtype: type = np.float32


def cached_features(
    feature_extractor,
    dataset,
    frame: pd.DataFrame,
    key: CacheKey,
    cache_dir: Path | None,
    label: str = "frozen features",
) -> CachedFeatures:
    """Features of `frame`'s images from the cache, or computed with one forward pass and stored."""
    (cached,) = cached_outputs(feature_extractor, dataset, frame, [Wanted(key, cache_dir)], label)
    return cached


def cached_outputs(
    model, dataset, frame: pd.DataFrame, wanted: Sequence[Wanted], label: str
) -> list[CachedFeatures]:
    """Each output of `model` (one per `wanted`) for `frame`'s images: from the cache, or all the
    missing ones computed together in one forward pass and stored.

    An entry is `<digest>.features.npy`, `<digest>.labels.npy` and `<digest>.json`, the record of
    both arrays' sizes and sha256, written last. An entry that does not match its record (a
    truncated or altered file, a missing record) is never fatal: a warning names the bad file
    and the entry is computed again and renamed over it. Nothing is deleted first: another run
    may be writing the same entry, and its files must not vanish under it. Batches are written
    to disk as they come, so the pass holds a few batches whatever the number of images. `label`
    names the pass's progress bar on a terminal.
    """
    entries, found = [], []
    for item in wanted:
        root = item.root if item.root is not None else Path(tempfile.mkdtemp(prefix="features-"))
        root.mkdir(parents=True, exist_ok=True)
        entry = CacheEntry.at(root, item.key.digest(frame))
        entries.append(entry)
        found.append(whole_entry(entry) if item.root is not None else None)
    missing = [i for i, cached in enumerate(found) if cached is None]
    if missing:
        outputs = [model.outputs[i] for i in missing]
        computing = model if len(outputs) == len(model.outputs) else _model_of(model, outputs)
        _compute(
            computing,
            dataset,
            len(frame),
            [(entries[i], wanted[i].dtype) for i in missing],
            label,
        )
    return [
        cached or CachedFeatures(entry.features, entry.labels, reused=False)
        for cached, entry in zip(found, entries, strict=True)
    ]


def _model_of(model, outputs):
    import keras

    return keras.Model(model.inputs, outputs, name=f"{model.name}_part")


# A pass streams each output into a partial file of its own, written with every batch. A partial
# file untouched for this long was left by a process killed mid-pass (SIGKILL, power loss).
_PARTIAL_PREFIX = ".partial-"
_ABANDONED_SECONDS = 600


def _remove_abandoned(folder: Path) -> None:
    """Delete the partial files that killed passes left in `folder`, so the cache does not
    grow by a pass's size with every kill; those being written are younger."""
    for path in folder.glob(f"{_PARTIAL_PREFIX}*.npy"):
        try:
            if time.time() - path.stat().st_mtime > _ABANDONED_SECONDS:
                path.unlink()
                log.info("Removed %s, left in the feature cache by a pass that was killed.", path)
        except FileNotFoundError:  # another process removed or renamed it first
            pass


def _compute(
    model, dataset, count: int, targets: list[tuple[CacheEntry, type]], label: str
) -> None:
    """One forward pass of `model`, its i-th output streamed into the i-th target's entry.

    Each file is hashed as it is written, so storing it costs no second read.
    """
    for folder in {entry.features.parent for entry, _ in targets}:
        _remove_abandoned(folder)
    labels = np.empty(count, np.int32)
    temps: list[Path] = []
    try:
        with ExitStack() as files:
            streams = []
            for (entry, dtype), output in zip(targets, model.outputs, strict=True):
                handle = files.enter_context(
                    tempfile.NamedTemporaryFile(
                        dir=entry.features.parent,
                        prefix=_PARTIAL_PREFIX,
                        suffix=".npy",
                        delete=False,
                    )
                )
                temps.append(Path(handle.name))
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(
                    header,
                    {
                        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                        "fortran_order": False,
                        "shape": (count, *output.shape[1:]),
                    },
                )
                stream = _HashedFile(handle)
                stream.write(header.getvalue())
                streams.append(stream)
            filled = 0
            for batch, batch_labels in forward_batches(model, dataset, count, label):
                for stream, (_, dtype), values in zip(streams, targets, batch, strict=True):
                    stream.write(np.ascontiguousarray(values, dtype=dtype).tobytes())
                labels[filled : filled + len(batch_labels)] = batch_labels
                filled += len(batch_labels)
        for temp, stream, (entry, _) in zip(temps, streams, targets, strict=True):
            os.chmod(temp, 0o666 & ~process_umask())
            store_entry(entry, temp, stream.record(), labels)
    except BaseException:
        for temp in temps:
            temp.unlink(missing_ok=True)
        raise


class _HashedFile:
    """A file being written, with the size and sha256 of what went into it."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle, self.size, self.digest = handle, 0, hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        self.digest.update(data)
        self.size += len(data)

    def record(self) -> dict[str, int | str]:
        return {"size": self.size, "sha256": self.digest.hexdigest()}
