"""The frozen-feature cache on disk: its keys, entries checked against their record, rows read
on demand."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import IO, Protocol

import numpy as np
import pandas as pd

from conf import ExpectedError

log = logging.getLogger(__name__)


class CacheKey(Protocol):
    def digest(self, frame: pd.DataFrame) -> str: ...


@dataclass(frozen=True)
class FrozenBaseKey:
    """What any output of the frozen base depends on: the data, the base and its weights, the
    image size. Each kind of cached output adds what else its values depend on."""

    data_version: str
    architecture: str
    options: str
    weights_sha256: str
    image_size: int

    def digest(self, frame: pd.DataFrame) -> str:
        return split_digest(asdict(self), frame)


@dataclass(frozen=True)
class FeatureKey(FrozenBaseKey):
    """Everything a frozen base's pooled output depends on; any change means new features."""

    pooling: str
    precision: str = "float32"


def split_digest(fields: dict, frame: pd.DataFrame) -> str:
    """The cache key of one split: a key's fields plus exactly which images, in which order.

    A float32 key leaves its precision out, so entries cached before compute.precision existed
    keep their names; a mixed_float16 key's digest differs from it.
    """
    if fields.get("precision") == "float32":
        fields = {name: value for name, value in fields.items() if name != "precision"}
    content = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    content.update("\n".join(frame["path"]).encode())
    return content.hexdigest()[:32]


@dataclass(frozen=True)
class CachedFeatures:
    """One split's features and label ids on disk, and whether they were already there.

    `rows` picks a split's images out of a larger entry (a comparison's pool of training images).
    """

    features: Path
    labels: Path
    reused: bool
    rows: np.ndarray | None = None

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        features, labels = np.load(self.features), np.load(self.labels)
        if self.rows is None:
            return features, labels
        return features[self.rows], labels[self.rows]

    def on_demand(self) -> tuple[StoredRows, np.ndarray]:
        """The features as rows read from the file when asked for, and the label ids."""
        labels = np.load(self.labels)
        return StoredRows.of(self.features, self.rows), (
            labels if self.rows is None else labels[self.rows]
        )


@dataclass(frozen=True)
class StoredRows:
    """The rows of a stored .npy array, read from its file batch by batch: neither loaded nor
    mapped, so memory holds the rows asked for and nothing else, whatever the file's size (the
    operating system's file cache keeps the file's pages as long as memory allows).

    `picked` maps row i to the file's row picked[i] (a split's rows of a pool's entry).
    """

    path: Path
    row_shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    count: int
    picked: np.ndarray | None = None

    @classmethod
    def of(cls, path: Path, picked: np.ndarray | None = None) -> StoredRows:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(handle)
            offset = handle.tell()
        if fortran:
            raise ValueError(f"{path} is stored in Fortran order; the cache writes C order")
        count = shape[0] if picked is None else len(picked)
        return cls(path, tuple(shape[1:]), dtype, offset, count, picked)

    def __len__(self) -> int:
        return self.count

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The rows numbered `rows`, in that order."""
        found = np.empty((len(rows), *self.row_shape), self.dtype)
        size = found.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        into = found.data.cast("B")
        in_file = rows if self.picked is None else self.picked[rows]
        with self.path.open("rb", buffering=0) as handle:
            for i, row in enumerate(in_file):
                got = os.preadv(
                    handle.fileno(),
                    [into[i * size : (i + 1) * size]],
                    self.offset + int(row) * size,
                )
                if got != size:
                    raise ValueError(f"{self.path} ends before row {row}")
        return found


def weights_fingerprint(model) -> str:
    """sha256 of a model's weight values, so the key follows the weights, not a file name."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(weight.numpy())
        digest.update(weight.path.encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


class CacheDirError(ExpectedError, OSError):
    """The feature cache folder cannot be created or written to."""


def check_cache_dir(path: Path) -> None:
    """Create the feature cache folder if needed and prove it writable, before any forward pass."""
    resolved = Path(path).resolve()
    try:
        resolved.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=resolved, prefix=".write-check-"):
            pass
    except OSError as error:
        raise CacheDirError(
            f"feature_extraction.cache_dir is {resolved}, which is not a writable folder "
            f"({error.strerror or error}). Point feature_extraction.cache_dir at a folder you "
            "can write to, or set it to null to compute the features afresh every run."
        ) from error


@dataclass(frozen=True)
class CacheEntry:
    """The files of one split's cache entry: two arrays and the record of their sizes and hashes."""

    features: Path
    labels: Path
    record: Path

    @classmethod
    def at(cls, root: Path, digest: str) -> CacheEntry:
        return cls(
            root / f"{digest}.features.npy", root / f"{digest}.labels.npy", root / f"{digest}.json"
        )

    def arrays(self) -> tuple[Path, Path]:
        return self.labels, self.features

    def files(self) -> tuple[Path, Path, Path]:
        return self.record, self.labels, self.features


def process_umask() -> int:
    """The process's umask, read without setting it (setting it races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc (macOS): the only way left is to set it and put it back
    os.umask(mask)
    return mask


def _write_temporary(folder: Path, suffix: str, write: Callable[[IO[bytes]], object]) -> Path:
    """A new temporary file in `folder` holding what `write` wrote, with the umask's permissions.

    NamedTemporaryFile creates files readable by their owner only; a cache a team shares must
    be readable by the others, as any file the user creates would be.
    """
    with tempfile.NamedTemporaryFile(dir=folder, suffix=suffix, delete=False) as handle:
        try:
            write(handle)
        except BaseException:
            handle.close()
            os.unlink(handle.name)
            raise
    os.chmod(handle.name, 0o666 & ~process_umask())
    return Path(handle.name)


def _file_record(path: Path) -> dict[str, int | str]:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def store_entry(
    entry: CacheEntry, features: Path, features_record: dict, labels: np.ndarray
) -> None:
    """Put the features' finished temporary file (`features_record`: its size and sha256), the
    labels and then their record in place.

    Concurrent runs may compute the same split; each writes temporary files of its own and renames
    them, so readers see whole files or none, and the record, renamed last, vouches for whole arrays.
    """
    written: dict[Path, Path] = {entry.features: features}  # where each file goes -> its temp
    try:
        written[entry.labels] = _write_temporary(
            entry.labels.parent, ".npy", partial(np.save, arr=labels)
        )
        records = {entry.features.name: features_record}
        records[entry.labels.name] = _file_record(written[entry.labels])
        written[entry.record] = _write_temporary(
            entry.record.parent, ".json", lambda handle: handle.write(json.dumps(records).encode())
        )
    except BaseException:
        for temp in written.values():
            temp.unlink(missing_ok=True)
        raise
    for path in (entry.labels, entry.features, entry.record):  # the record last
        os.replace(written[path], path)
    _checked[entry] = _identity(entry)


# Entries this process wrote or checked, with the identity of their files then: reading one again
# in the same process skips the sha256 (3 s a GB here) unless a file was replaced or changed since.
_checked: dict[CacheEntry, tuple] = {}


def _identity(entry: CacheEntry) -> tuple:
    """Inode, size and modification time of each file of an entry."""
    stats = [path.stat() for path in entry.files()]
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


def _damage(entry: CacheEntry) -> tuple[Path, str] | None:
    """The first file of a stored entry that does not match its record, and how; None if whole.

    Sizes are compared first (a truncated file, the usual damage, costs no read), then sha256,
    and last numpy reads each array's header, so `CachedFeatures.load` will not fail later.
    """
    try:
        record = json.loads(entry.record.read_text())
        expected = {path: record[path.name] for path in entry.arrays()}
        sizes = {path: int(expected[path]["size"]) for path in entry.arrays()}
        hashes = {path: str(expected[path]["sha256"]) for path in entry.arrays()}
    except FileNotFoundError:
        return entry.record, "missing (it records the arrays' sizes and checksums)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return entry.record, f"unreadable ({type(error).__name__}: {error})"
    for path in entry.arrays():
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return path, "missing"
        if size != sizes[path]:
            return path, f"{size} bytes long where {sizes[path]} were written"
    for path in entry.arrays():
        if _file_record(path)["sha256"] != hashes[path]:
            return path, "changed since it was written (its sha256 differs)"
    for path in entry.arrays():
        try:
            np.load(path, mmap_mode="r")
        except Exception as error:  # whatever numpy cannot read, training could not either
            return path, f"unreadable by numpy ({type(error).__name__}: {error})"
    return None


def whole_entry(entry: CacheEntry) -> CachedFeatures | None:
    """The stored entry when it is whole; None when absent, or damaged (then said)."""
    if not any(path.exists() for path in entry.files()):
        return None
    try:
        unchanged = _checked.get(entry) == _identity(entry)
    except FileNotFoundError:
        unchanged = False
    damage = None if unchanged else _damage(entry)
    if damage is None:
        _checked[entry] = _identity(entry)
        return CachedFeatures(entry.features, entry.labels, reused=True)
    path, problem = damage
    log.warning(
        "Feature cache file %s is %s; recomputing this split's features and replacing the "
        "cache entry.",
        path,
        problem,
    )
    return None


def picked_rows(cached: CachedFeatures, pool: pd.DataFrame, frame: pd.DataFrame) -> CachedFeatures:
    """`frame`'s rows of an entry cached for `pool`, a superset of its images."""
    rows = pd.Index(pool["path"]).get_indexer(frame["path"])
    if (rows < 0).any():
        raise ValueError("the training pool must hold every training image of the table")
    return replace(cached, rows=rows)
