"""The Fashion-MNIST demo dataset: a small-label cut written as PNG files plus a CSV manifest."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.data import DemoDataConfig
from conf.errors import ExpectedError
from tasks.runtime.keras_internals import keras_home

CLASS_NAMES = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
FILES = (
    "train-labels-idx1-ubyte.gz",
    "train-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
TRAIN_PER_CLASS = 6000
TEST_PER_CLASS = 1000


class FashionMnistNotFoundError(ExpectedError, RuntimeError):
    """Fashion-MNIST is neither in the Keras cache nor installed, and could not be downloaded."""


@dataclass(frozen=True)
class DemoDataset:
    """Where the demo dataset was written and how many images each split holds."""

    root: Path
    manifest: Path
    counts: dict[str, int]


def keras_dataset_dir() -> Path:
    """The folder `keras.datasets.fashion_mnist.load_data()` reads its four files from.

    Keras takes `$KERAS_HOME` (read when keras is imported; default `~/.keras`) and falls back to
    `/tmp/.keras` when that folder is not writable; a folder that does not exist yet counts as not
    writable, so it is created first to keep Keras from silently moving to `/tmp`.
    """
    home = Path(os.path.expanduser(keras_home()))
    with contextlib.suppress(OSError):  # an unwritable home is handled just below
        home.mkdir(parents=True, exist_ok=True)
    if not os.access(home, os.W_OK):
        home = Path("/tmp") / ".keras"
    return home / "datasets" / "fashion-mnist"


def load_fashion_mnist() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST through the Keras loader, seeded from the Debian package when offline.

    Keras uses files already in its cache without a hash check, so copies of the Debian package's
    files (`apt-get install dataset-fashion-mnist`) make the real loader work without internet.
    """
    from keras.datasets import fashion_mnist

    cache = keras_dataset_dir()
    missing = [name for name in FILES if not (cache / name).is_file()]
    if missing and all((DEBIAN_DIR / name).is_file() for name in missing):
        cache.mkdir(parents=True, exist_ok=True)
        for name in missing:
            partial = cache / f"{name}.partial"
            shutil.copyfile(DEBIAN_DIR / name, partial)
            os.replace(partial, cache / name)  # never leave a truncated file that Keras would trust
        missing = []
    try:
        return fashion_mnist.load_data()
    except Exception as error:
        if not missing:
            raise
        raise FashionMnistNotFoundError(
            f"Fashion-MNIST is not available offline and could not be downloaded ({error}). "
            f"Install it with `apt-get install dataset-fashion-mnist` (files in {DEBIAN_DIR}), "
            f"or place {', '.join(FILES)} in {cache}."
        ) from error


def write_demo_dataset(
    out: Path, train_per_class: int, val_per_class: int, test_per_class: int, seed: int
) -> DemoDataset:
    """Write a seeded few-labels cut of Fashion-MNIST to `out` as PNG files and manifest.csv.

    Train and val images are drawn per class from the 60,000 training images; test images are the
    first `test_per_class` of each class in the 10,000 test images (1000 keeps the whole test set).
    Files are byte-for-byte reproducible so the DVC hash of `out` is the same on every machine. The
    folder is rebuilt beside `out` and swapped in, so stale files vanish and files that DVC linked
    from its cache are replaced rather than overwritten.
    """
    if (
        train_per_class < 1
        or val_per_class < 0
        or train_per_class + val_per_class > TRAIN_PER_CLASS
    ):
        raise ValueError(
            f"train_per_class ({train_per_class}) must be at least 1 and val_per_class "
            f"({val_per_class}) at least 0, together at most {TRAIN_PER_CLASS} per class"
        )
    if not 1 <= test_per_class <= TEST_PER_CLASS:
        raise ValueError(f"test_per_class must be 1 to {TEST_PER_CLASS}, got {test_per_class}")
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()

    rng = np.random.default_rng(seed)
    end = train_per_class + val_per_class
    picks: list[tuple[str, int, np.ndarray, np.ndarray]] = []  # split, class id, indices, images
    for class_id in range(len(CLASS_NAMES)):
        drawn = rng.permutation(np.flatnonzero(y_train == class_id))
        picks.append(("train", class_id, np.sort(drawn[:train_per_class]), x_train))
        picks.append(("val", class_id, np.sort(drawn[train_per_class:end]), x_train))
    for class_id in range(len(CLASS_NAMES)):
        first = np.flatnonzero(y_test == class_id)[:test_per_class]
        picks.append(("test", class_id, first, x_test))

    out = Path(out).absolute()
    building = out.with_name(f".{out.name}.building")
    shutil.rmtree(building, ignore_errors=True)
    rows = []
    for split, class_id, indices, images in picks:
        folder = building / "images" / split / CLASS_NAMES[class_id]
        folder.mkdir(parents=True, exist_ok=True)
        for index in indices:
            relative = f"images/{split}/{CLASS_NAMES[class_id]}/{index:05d}.png"
            (building / relative).write_bytes(_grey_png(images[index]))
            rows.append((relative, CLASS_NAMES[class_id], split))
    manifest = pd.DataFrame(rows, columns=["path", "label", "split"])
    manifest.to_csv(building / "manifest.csv", index=False, lineterminator="\n")

    retired = out.with_name(f".{out.name}.retired")
    shutil.rmtree(retired, ignore_errors=True)
    if out.exists():
        out.rename(retired)
    building.rename(out)
    shutil.rmtree(retired, ignore_errors=True)
    counts = {split: int((manifest["split"] == split).sum()) for split in ("train", "val", "test")}
    return DemoDataset(root=out, manifest=out / "manifest.csv", counts=counts)


def _grey_png(pixels: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG whose image data is stored uncompressed.

    Encoded by hand because zlib builds (zlib, zlib-ng in Pillow's wheels) may emit different
    deflate streams for the same pixels, which would change the dataset's DVC hash between
    machines; stored blocks, CRC-32 and Adler-32 are fully specified. No metadata chunks.
    """
    height, width = pixels.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(pixels, np.uint8))
    if len(raw) > 0xFFFF:
        raise ValueError(f"image of {width}x{height} is too large for one stored deflate block")
    stored = (
        b"\x78\x01"  # zlib header: deflate, 32K window, no preset dictionary
        + struct.pack("<BHH", 1, len(raw), len(raw) ^ 0xFFFF)  # final stored block
        + raw
        + struct.pack(">I", zlib.adler32(raw))
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stored) + chunk(b"IEND", b"")
    )


# --- Prefect steps -------------------------------------------------------------------------------


@task(name="build-demo-dataset", cache_policy=NO_CACHE)
def build_demo_dataset(demo: DemoDataConfig, project: Path) -> DemoDataset:
    """Write the demo cut that the config's `demo:` section describes."""
    return write_demo_dataset(
        (project / demo.out).resolve(),
        train_per_class=demo.train_per_class,
        val_per_class=demo.val_per_class,
        test_per_class=demo.test_per_class,
        seed=demo.seed,
    )


@task(name="write-demo-report", cache_policy=NO_CACHE)
def write_demo_report(
    project: Path, pinned: str | None, built: str, counts: dict[str, int]
) -> Path:
    """reports/demo_data.json: the split sizes and whether the build matches the pinned version."""
    report = project / "reports" / "demo_data.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    summary = {"pinned": pinned, "built": built, "matches_pin": pinned == built, "counts": counts}
    report.write_text(json.dumps(summary, indent=2) + "\n")
    return report
