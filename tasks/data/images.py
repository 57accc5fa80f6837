"""The data stage: pull the pinned version with DVC, list and split the images, stream them."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import yaml
from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from conf.errors import ExpectedError
from tasks.runtime.credentials import redact_url
from tasks.runtime.timeouts import call_within

if TYPE_CHECKING:
    import tensorflow as tf
    from dvc.repo import Repo

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.csv"
# What image_dataset decodes, as Pillow names the formats (MPO: the JPEG of many cameras).
# TensorFlow also reads WebP, but only to uint8, and image_dataset decodes to uint16.
DECODABLE_FORMATS = frozenset({"PNG", "JPEG", "MPO", "GIF", "BMP"})


class DataError(ExpectedError, ValueError):
    """The images or their listing cannot be used as given."""


class DataNotFoundError(DataError):
    """A folder, manifest, .dvc file or listed image does not exist."""


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


class DataVersionMismatchError(DataError):
    """The data in the workspace is not the version its .dvc file pins."""


class DvcPullError(ExpectedError, RuntimeError):
    """`dvc pull` could not bring the pinned data from the remote."""


@dataclass(frozen=True)
class DataVersion:
    """The tracked data folder and the DVC hash that identifies its exact content."""

    path: Path
    md5: str


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
        return _label_ids(frame, self.classes)


def data_version(repo_root: Path, dvc_file: str) -> DataVersion:
    """The data folder and hash that `dvc_file` pins, after checking the workspace holds them.

    Use it instead of `pull_data` where the data is already in place, e.g. inside a `dvc repro`
    stage that lists the folder as a dependency (`dvc repro --pull` fetches it first).
    """
    from dvc.repo import Repo

    repo_root = Path(repo_root).absolute()
    out = _tracked_output(repo_root, dvc_file)
    path = Path(os.path.normpath((repo_root / dvc_file).parent / out["path"]))
    md5 = str(out["md5"])
    with Repo(os.fspath(repo_root)) as repo:
        changes = repo.status(targets=[os.fspath(repo_root / dvc_file)])  # DVC resolves from cwd
    if changes:
        states = [
            f"{out} {state}"
            for entries in changes.values()
            for entry in entries
            if isinstance(entry, dict)
            for out, state in entry.get("changed outs", {}).items()
        ]
        raise DataVersionMismatchError(
            f"{path} is not the version {dvc_file} pins ({md5}): {', '.join(states) or changes}. "
            f"Run `dvc checkout {dvc_file}` (or `dvc pull {dvc_file}`) to restore the pinned data, "
            f"or `dvc add` the folder and commit {dvc_file} to pin your changes."
        )
    return DataVersion(path=path, md5=md5)


def pull_data(repo_root: Path, dvc_file: str) -> DataVersion:
    """`dvc pull` the data that `dvc_file` pins and return its folder and hash."""
    from dvc.exceptions import CheckoutError, DownloadError, DvcException
    from dvc.repo import Repo

    repo_root = Path(repo_root).absolute()
    out = _tracked_output(repo_root, dvc_file)  # a bad .dvc file fails before any transfer
    with Repo(os.fspath(repo_root)) as repo:
        remote, url = _remote_of(repo, out)
        try:
            repo.pull(targets=[os.fspath(repo_root / dvc_file)])  # DVC resolves targets from cwd
        except (CheckoutError, DownloadError) as error:
            raise DvcPullError(_unreachable_message(dvc_file, remote, url, error)) from error
        except DvcException as error:
            raise DvcPullError(f"`dvc pull {dvc_file}` failed: {error}") from error
    return data_version(repo_root, dvc_file)


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


def image_dataset(
    frame: pd.DataFrame,
    classes: Sequence[str],
    image_size: int,
    batch_size: int,
    shuffle_seed: int | None = None,
    augment: Callable | None = None,
) -> tf.data.Dataset:
    """Batches of (float32 RGB images in [0, 255] of image_size x image_size, int32 labels).

    Files are read and decoded on the fly (tasks/data/decoding.py), so memory holds only a few
    batches. Only paths are shuffled (a full shuffle is then cheap), reshuffled each epoch.
    `augment`, a Keras layer, changes each batch at random (training=True): new changes every epoch.
    """
    import tensorflow as tf  # imported here so listing or checking data does not load TensorFlow

    from tasks.data.decoding import image_batches

    paths = tf.constant(frame["path"].tolist(), dtype=tf.string)
    labels = tf.constant(_label_ids(frame, tuple(classes)), dtype=tf.int32)
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(
            max(len(frame), 1), seed=shuffle_seed, reshuffle_each_iteration=True
        )
    batches = image_batches(dataset, image_size, batch_size, files=True)
    if augment is None:
        return batches
    return batches.map(lambda images, labels: (augment(images, training=True), labels)).prefetch(2)


def _tracked_output(repo_root: Path, dvc_file: str) -> dict:
    """The first output a .dvc file tracks: its `path`, `md5` and optional `remote`."""
    dvc_path = repo_root / dvc_file
    if not dvc_path.is_file():
        raise DataNotFoundError(
            f"{dvc_path} does not exist; track the data with `dvc add <folder>` and commit the "
            ".dvc file, or set data.dvc_file to null to skip DVC"
        )
    outs = (yaml.safe_load(dvc_path.read_text()) or {}).get("outs") or [{}]
    if "md5" not in outs[0] or "path" not in outs[0]:
        raise DataNotFoundError(f"{dvc_path} pins no output with an md5; re-run `dvc add`")
    return outs[0]


def _remote_of(repo: Repo, out: dict) -> tuple[str | None, str | None]:
    """The remote a pull would use and its URL as shown: without user, password or tokens."""
    name = out.get("remote") or repo.config["core"].get("remote")
    url = repo.config["remote"].get(name, {}).get("url") if name else None
    return name, redact_url(url) if url else None


def _unreachable_message(
    dvc_file: str, remote: str | None, url: str | None, error: Exception
) -> str:
    head = f"`dvc pull {dvc_file}` could not get the data"
    if remote is None:
        return (
            f"{head}: no DVC remote is configured and the local cache lacks it. Add one with "
            f"`dvc remote add -d <name> <url>` (see `dvc remote list`). DVC said: {error}"
        )
    where = f"remote '{remote}' ({url})"
    if url and "://" not in url and not os.path.isdir(url):
        problem = f"the {where} is a local folder that does not exist"
    else:
        problem = f"the {where} is unreachable or does not hold this version"
    return (
        f"{head}: {problem}. Check `dvc remote list` and your access to it, and run `dvc push` "
        f"from the machine that has the data. DVC said: {error}"
    )


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


def _label_ids(frame: pd.DataFrame, classes: tuple[str, ...]) -> np.ndarray:
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


def _retry_failed_downloads(task, task_run, state) -> bool:
    """Retry only interrupted transfers; a missing remote or a bad .dvc file will not heal."""
    from dvc.exceptions import DownloadError

    try:
        state.result()
    except DvcPullError as error:
        return isinstance(error.__cause__, DownloadError)
    except Exception:
        return False
    return False


def fingerprint_files(path: Path) -> str:
    """A version id for data outside DVC: names, sizes and modification times of its files."""
    import hashlib

    folder = path.parent if path.is_file() else path
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"files-{digest.hexdigest()[:32]}"


@task(
    name="pull-data",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=_retry_failed_downloads,
)
def pull_data_version(loaded) -> str:
    """Pull the data version the .dvc file pins and return its hash (files' fingerprint without DVC).

    Inside a `dvc repro` stage DVC has already checked the data out, so the step only verifies it.
    """
    dvc_file = loaded.config.data.dvc_file
    if dvc_file is None:
        path = loaded.path(loaded.config.data.path)
        if not path.exists():
            raise DataNotFoundError(f"data path {path} does not exist; set data.path in the config")
        return fingerprint_files(path)
    if os.environ.get("DVC_STAGE"):
        return data_version(loaded.project, dvc_file).md5
    budget = loaded.config.timeouts.dvc_pull_seconds
    pulled = call_within(
        budget,
        f"`dvc pull {dvc_file}` did not finish within timeouts.dvc_pull_seconds ({budget} s): "
        "the DVC remote is slow or does not answer. Check the remote (`dvc remote list`, "
        "`dvc status -c`), or raise timeouts.dvc_pull_seconds for a large first pull.",
        lambda: pull_data(loaded.project, dvc_file),
    )
    return pulled.md5


@task(name="load-images", cache_policy=NO_CACHE)
def load_images(loaded, data_version: str) -> ImageTable:
    """Read the dataset's table and split, and check every image decodes, before any training.

    Undecodable files fail the run or, with `data.on_bad_images: skip`, are left out and listed
    in the table's `skipped`.
    """
    config = loaded.config
    table = load_image_table(
        loaded.path(config.data.path),
        config.data.val_fraction,
        config.data.test_fraction,
        config.seed,
    )
    return check_images(table, config.data.on_bad_images)


@task(name="read-pinned-version", cache_policy=NO_CACHE)
def pinned_data_version(loaded) -> str | None:
    """The hash the .dvc file pins now, or None when the repository has none yet."""
    dvc_file = loaded.config.data.dvc_file
    if dvc_file is None or not (loaded.project / dvc_file).is_file():
        return None
    return str(_tracked_output(loaded.project, dvc_file)["md5"])


@task(name="dvc-add", cache_policy=NO_CACHE)
def track_data_version(loaded) -> str:
    """`dvc add` the data folder the .dvc file tracks; returns the new hash it pins."""
    from dvc.repo import Repo

    dvc_file = loaded.config.data.dvc_file or "data.dvc"
    tracked = loaded.project / Path(dvc_file).with_suffix("")
    with Repo(os.fspath(loaded.project)) as repo:
        repo.add([os.fspath(tracked)])  # DVC resolves targets from cwd: pass absolute paths
    return str(_tracked_output(loaded.project, dvc_file)["md5"])


@task(
    name="dvc-push",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
)
def push_data_version(loaded) -> int:
    """`dvc push` the pinned data to the repository's default remote; returns files pushed."""
    from dvc.repo import Repo

    dvc_file = loaded.config.data.dvc_file or "data.dvc"
    with Repo(os.fspath(loaded.project)) as repo:
        return int(repo.push(targets=[os.fspath(loaded.project / dvc_file)]))
