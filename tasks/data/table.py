"""The image table: images listed from class folders or a manifest, split, and checked to decode."""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.data import DataConfig
from tasks.data.errors import DataError, DataNotFoundError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.csv"
# What image_dataset decodes, as Pillow names the formats (MPO: the JPEG of many cameras).
# TensorFlow also reads WebP, but only to uint8, and image_dataset decodes to uint16.
DECODABLE_FORMATS = frozenset({"PNG", "JPEG", "MPO", "GIF", "BMP"})


class EmptyDatasetError(DataError):
    """There are no images, or some class has none (for training)."""


class ManifestError(DataError):
    """A CSV manifest is malformed: columns, values, file types or duplicates."""


class UndecodableImagesError(DataError):
    """Some image files cannot be decoded; `bad` maps each path to the reason."""

    def __init__(self, bad: dict[str, str]):
        self.bad = bad
        super().__init__(
            f"{len(bad)} image file(s) cannot be decoded; fix or remove them (and drop them from "
            "the manifest if there is one), or set data.on_bad_images: skip to train without "
            f"them:\n{_listing(bad)}"
        )


def _listing(bad: dict[str, str]) -> str:
    return "\n".join(f"  {path}: {reason}" for path, reason in sorted(bad.items()))


@dataclass(frozen=True)
class ImageTable:
    """Every image with its label and split; a class's index is its position in `classes`.

    `skipped` lists the (path, problem) of files left out because they cannot be decoded
    (`data.on_bad_images: skip`); they are not in `frame`.
    """

    frame: pd.DataFrame
    classes: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()

    def split(self, name: str) -> pd.DataFrame:
        """The rows of one split ('train', 'val' or 'test')."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {name!r}")
        return self.frame[self.frame["split"] == name].reset_index(drop=True)

    def label_ids(self, frame: pd.DataFrame) -> np.ndarray:
        """The class index of each row, as int32."""
        return class_indices(frame, self.classes)


def load_image_table(
    path: Path, val_fraction: float, test_fraction: float, seed: int
) -> ImageTable:
    """List the images under `path` with their labels and a train/val/test split.

    `path` is a CSV manifest (path,label[,split]; paths relative to the CSV's folder or absolute),
    a folder holding such a `manifest.csv`, or a folder of class folders (`root/<class>/...`,
    images at any depth below the class folder; hidden files and folders are skipped, other
    files ignored). Without a split column the split is stratified and seeded per class, so the
    split of one class does not move when classes are added, and every class keeps at least one
    training image.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            "val_fraction and test_fraction must be in [0, 1) with a sum below 1, got "
            f"{val_fraction} and {test_fraction}"
        )
    path = Path(path).absolute()
    if not path.exists():
        raise DataNotFoundError(
            f"{path} does not exist; point data.path at a folder of class folders or a CSV "
            "manifest (and run `dvc pull` if the data is tracked by DVC)"
        )
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        path = path / MANIFEST_NAME
    if path.is_dir():
        frame, classes = _scan_class_folders(path)
    elif path.suffix.lower() == ".csv":
        frame = _read_manifest(path)
        classes = tuple(sorted(frame["label"].unique()))
    else:
        raise DataError(f"{path} is neither a folder nor a .csv manifest")

    if "split" not in frame.columns:
        frame["split"] = _stratified_split(frame, val_fraction, test_fraction, seed)
    untrained = _untrained_classes(frame, classes)
    if untrained:
        raise EmptyDatasetError(
            f"class(es) {', '.join(untrained)} have no training images in {path}; add some or "
            "remove the class"
        )
    return ImageTable(
        frame=frame[["path", "label", "split"]].reset_index(drop=True), classes=classes
    )


def find_undecodable_images(paths: Sequence[str]) -> dict[str, str]:
    """Each file that cannot be decoded, with the reason.

    Pillow checks the PNG chunk checksums (verify) and then decodes every pixel (load), which
    catches truncated, corrupt and non-image files before a training epoch trips over them.
    Threads overlap the file reads; decoding small images is cheap. The threads take 256 paths
    at a time because the pool makes every future up front: one per image held 90 MB for 60,000.
    """
    chunks = [paths[start : start + 256] for start in range(0, len(paths), 256)]
    bad: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=min(8, 4 * (os.cpu_count() or 1))) as pool:
        for chunk, reasons in zip(chunks, pool.map(_decode_problems, chunks), strict=True):
            bad.update(
                (path, reason) for path, reason in zip(chunk, reasons, strict=True) if reason
            )
    return bad


def check_images(table: ImageTable, on_bad_images: Literal["fail", "skip"] = "fail") -> ImageTable:
    """`table` with every image decodable: 'fail' raises UndecodableImagesError naming the rest,
    'skip' leaves them out and lists them in `skipped`.

    Skipping still fails, with EmptyDatasetError, where it would leave a class no training image.
    """
    bad = find_undecodable_images(table.frame["path"].tolist())
    if not bad:
        return table
    if on_bad_images == "fail":
        raise UndecodableImagesError(bad)
    frame = table.frame[~table.frame["path"].isin(list(bad))].reset_index(drop=True)
    untrained = _untrained_classes(frame, table.classes)
    if untrained:
        raise EmptyDatasetError(
            f"class(es) {', '.join(untrained)} have no training images left once the "
            f"{len(bad)} undecodable file(s) are skipped; fix or remove these files, or add "
            f"images to the class:\n{_listing(bad)}"
        )
    return ImageTable(frame=frame, classes=table.classes, skipped=tuple(sorted(bad.items())))


def _scan_class_folders(root: Path) -> tuple[pd.DataFrame, tuple[str, ...]]:
    class_dirs = sorted(
        entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )
    rows: list[tuple[str, str]] = []
    empty: list[str] = []
    for class_dir in class_dirs:
        found = images_under(class_dir)
        if not found:
            empty.append(class_dir.name)
        rows.extend((path, class_dir.name) for path in found)
    if not rows:
        raise EmptyDatasetError(
            f"no images (.png, .jpg, .jpeg) in class folders under {root}; expected "
            f"{root}/<class>/<image> or a {MANIFEST_NAME}"
        )
    if empty:
        raise EmptyDatasetError(
            f"class folder(s) {', '.join(empty)} under {root} hold no images (.png, .jpg, .jpeg); "
            "add images or remove the folder(s)"
        )
    return pd.DataFrame(rows, columns=["path", "label"]), tuple(d.name for d in class_dirs)


def images_under(folder: Path) -> list[str]:
    """Every image file under `folder`, sorted; hidden files and folders are skipped."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        found += [
            os.path.join(parent, name)
            for name in files
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
        ]
    return sorted(found)


def _read_manifest(manifest: Path) -> pd.DataFrame:
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    missing_columns = {"path", "label"} - set(frame.columns)
    if missing_columns:
        raise ManifestError(
            f"{manifest} lacks column(s) {', '.join(sorted(missing_columns))}; it needs path,label "
            f"and optionally split (found: {', '.join(frame.columns)})"
        )
    if frame.empty:
        raise EmptyDatasetError(f"{manifest} lists no images")
    line = frame.index + 2  # the header is line 1

    def fail_rows(bad: pd.Series, problem: str) -> None:
        if bad.any():
            rows = ", ".join(
                f"line {n}: {p!r}" for n, p in zip(line[bad], frame.loc[bad, "path"], strict=True)
            )
            raise ManifestError(f"{manifest}: {problem}: {_shorten(rows)}")

    fail_rows((frame["path"] == "") | (frame["label"] == ""), "rows with an empty path or label")
    if "split" in frame.columns:
        fail_rows(~frame["split"].isin(SPLITS), f"split values other than {'/'.join(SPLITS)}")
    suffixes = frame["path"].map(lambda p: os.path.splitext(p)[1].lower())
    fail_rows(~suffixes.isin(IMAGE_SUFFIXES), "unsupported file types (use .png, .jpg or .jpeg)")
    frame["path"] = [
        os.path.normpath(os.path.join(manifest.parent, p)) for p in frame["path"]
    ]  # normpath rather than resolve: DVC may link files into its cache
    fail_rows(frame["path"].duplicated(keep=False), "images listed more than once")
    missing = [p for p in frame["path"] if not os.path.isfile(p)]
    if missing:
        raise DataNotFoundError(
            f"{len(missing)} of {len(frame)} files listed in {manifest} do not exist (run "
            f"`dvc pull` if the data is tracked by DVC): {_shorten(', '.join(missing))}"
        )
    return frame


def _stratified_split(
    frame: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int
) -> pd.Series:
    split = pd.Series("train", index=frame.index)
    for label, rows in frame.groupby("label", sort=True):
        ordered = rows.sort_values("path").index.to_numpy()
        count = len(ordered)
        n_test = min(round(count * test_fraction), count - 1)
        n_val = min(round(count * val_fraction), count - 1 - n_test)
        rng = np.random.default_rng([seed, zlib.crc32(str(label).encode())])
        shuffled = ordered[rng.permutation(count)]
        split[shuffled[:n_test]] = "test"
        split[shuffled[n_test : n_test + n_val]] = "val"
    return split


def _untrained_classes(frame: pd.DataFrame, classes: Sequence[str]) -> list[str]:
    return sorted(set(classes) - set(frame.loc[frame["split"] == "train", "label"]))


def class_indices(frame: pd.DataFrame, classes: tuple[str, ...]) -> np.ndarray:
    """The index in `classes` of each row's label, as int32; DataError for a label not there."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(frame["label"]) - index.keys())
    if unknown:
        raise DataError(f"labels {', '.join(unknown)} are not among the classes {classes}")
    return frame["label"].map(index).to_numpy(dtype=np.int32)


def _decode_problems(paths: Sequence[str]) -> list[str | None]:
    return [_decode_problem(path) for path in paths]


def _decode_problem(path: str) -> str | None:
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            if image.format not in DECODABLE_FORMATS:
                return f"{image.format} content, which TensorFlow cannot decode (use PNG or JPEG)"
            image.load()
    except Exception as error:  # any failure means TensorFlow would fail mid-epoch too
        return f"{type(error).__name__}: {error}"
    return None


def _shorten(listing: str, limit: int = 2000) -> str:
    return listing if len(listing) <= limit else f"{listing[:limit]} ... (more omitted)"


# --- Prefect steps -------------------------------------------------------------------------------


@task(name="load-images", cache_policy=NO_CACHE)
def load_images(data: DataConfig, project: Path, seed: int, data_version: str) -> ImageTable:
    """Read the dataset's table and split, and check every image decodes, before any training.

    Undecodable files fail the run or, with `data.on_bad_images: skip`, are left out and listed
    in the table's `skipped`. `seed` draws the split; `data_version` (pull-data's) is the version
    the files on disk are.
    """
    table = load_image_table(
        (project / data.path).resolve(), data.val_fraction, data.test_fraction, seed
    )
    return check_images(table, data.on_bad_images)
