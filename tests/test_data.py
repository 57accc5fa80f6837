"""The data stage on tiny images made here: listing, splitting, checking, decoding, DVC pulls."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tasks.data.errors import DataNotFoundError
from tasks.data.stream import image_dataset
from tasks.data.table import (
    EmptyDatasetError,
    ManifestError,
    UndecodableImagesError,
    check_images,
    find_undecodable_images,
    load_image_table,
)
from tasks.data.versioning import DataVersionMismatchError, DvcPullError, data_version, pull_data


def save_image(path: Path, kind: str, size: tuple[int, int] = (12, 9)) -> Path:
    """One small image of a known colour; `size` is (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    if kind == "grey":
        Image.new("L", size, 200).save(path)
    elif kind == "rgb":
        Image.new("RGB", size, (255, 0, 0)).save(path)
    elif kind == "rgba":
        Image.new("RGBA", size, (0, 255, 0, 40)).save(path)
    elif kind == "palette":
        Image.new("RGB", size, (0, 0, 255)).convert("P").save(path)
    elif kind == "16bit":
        Image.fromarray(np.full((height, width), 65535, np.uint16)).save(path)
    elif kind == "jpeg":
        Image.new("RGB", size, (128, 128, 128)).save(path, quality=95)
    else:
        raise ValueError(kind)
    return path


def class_folders(root: Path, per_class: dict[str, int]) -> Path:
    for label, count in per_class.items():
        for i in range(count):
            save_image(root / label / f"{i:03d}.png", "grey", (4, 4))
    return root


def write_manifest(
    folder: Path, rows: Sequence[tuple[str, ...]], columns: str = "path,label,split"
) -> Path:
    manifest = folder / "manifest.csv"
    manifest.write_text(columns + "\n" + "".join(",".join(row) + "\n" for row in rows))
    return manifest


def batches(dataset) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(images.numpy(), labels.numpy()) for images, labels in dataset]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


# --- decoding -----------------------------------------------------------------------------------


def test_every_image_kind_becomes_float_rgb_in_0_255(tmp_path):
    sizes = {"grey": (5, 7), "rgb": (30, 20), "rgba": (9, 9), "palette": (64, 48)}
    sizes |= {"16bit": (6, 6), "jpeg": (40, 50)}
    rows = []
    for kind, size in sizes.items():
        suffix = ".jpg" if kind == "jpeg" else ".png"
        save_image(tmp_path / f"{kind}{suffix}", kind, size)
        rows.append((f"{kind}{suffix}", kind, "train"))
    table = load_image_table(write_manifest(tmp_path, rows), 0.0, 0.0, seed=0)
    train = table.split("train")

    shapes = [
        (images.shape, images.dtype.name, labels.shape, labels.dtype.name)
        for images, labels in image_dataset(train, table.classes, image_size=32, batch_size=4)
    ]
    assert shapes == [
        ((4, 32, 32, 3), "float32", (4,), "int32"),
        ((2, 32, 32, 3), "float32", (2,), "int32"),
    ]
    images, labels = batches(image_dataset(train, table.classes, 32, 4))
    assert images.min() >= 0.0 and images.max() <= 255.0
    pixel = {kind: images[i].mean(axis=(0, 1)) for i, kind in enumerate(train["label"])}
    np.testing.assert_allclose(pixel["grey"], [200, 200, 200], atol=1e-3)
    np.testing.assert_allclose(pixel["rgb"], [255, 0, 0], atol=1e-3)
    np.testing.assert_allclose(pixel["rgba"], [0, 255, 0], atol=1e-3)  # alpha dropped
    np.testing.assert_allclose(pixel["palette"], [0, 0, 255], atol=1e-3)
    np.testing.assert_allclose(pixel["16bit"], [255, 255, 255], atol=1e-3)  # 16-bit white
    np.testing.assert_allclose(pixel["jpeg"], [128, 128, 128], atol=2)
    assert list(labels) == [table.classes.index(kind) for kind in train["label"]]


def test_8bit_pixels_pass_through_exactly_and_16bit_scale_by_257(tmp_path):
    grey = (np.arange(28 * 28).reshape(28, 28) % 256).astype(np.uint8)
    deep = np.full((28, 28), 257 * 100 + 128, np.uint16)  # between grey levels 100 and 101
    for name, pixels in (("a", grey), ("b", deep)):
        (tmp_path / name).mkdir()
        Image.fromarray(pixels).save(tmp_path / name / "x.png")
    table = load_image_table(tmp_path, 0.0, 0.0, seed=0)

    images, _ = batches(image_dataset(table.frame, table.classes, 28, 2))
    np.testing.assert_array_equal(images[0, :, :, 0], grey.astype(np.float32))
    np.testing.assert_allclose(images[1], (257 * 100 + 128) / 257, rtol=1e-6)


def test_order_is_fixed_without_shuffle_and_seeded_with_it(tmp_path):
    table = load_image_table(class_folders(tmp_path, {"a": 8, "b": 8, "c": 8}), 0.0, 0.0, 0)
    frame = table.frame
    fixed = image_dataset(frame, table.classes, 8, 5)
    assert list(batches(fixed)[1]) == list(table.label_ids(frame)) == list(batches(fixed)[1])

    first = image_dataset(frame, table.classes, 8, 24, shuffle_seed=3)
    again = image_dataset(frame, table.classes, 8, 24, shuffle_seed=3)
    other = image_dataset(frame, table.classes, 8, 24, shuffle_seed=4)
    epoch_1, epoch_2 = (list(next(iter(first))[1].numpy()) for _ in range(2))
    assert epoch_1 == list(next(iter(again))[1].numpy())
    assert epoch_1 != epoch_2  # reshuffled each epoch
    assert epoch_1 != list(next(iter(other))[1].numpy())
    assert sorted(epoch_1) == sorted(table.label_ids(frame))


# --- listing class folders --------------------------------------------------------------------


def test_class_folders_list_images_at_any_depth_and_ignore_other_files(tmp_path):
    class_folders(tmp_path, {"cat": 2, "dog": 1})
    save_image(tmp_path / "dog" / "2024" / "summer" / "IMG_1.JPEG", "jpeg")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    save_image(tmp_path / "dog" / ".thumbs" / "hidden.png", "grey")
    (tmp_path / ".git").mkdir()

    table = load_image_table(tmp_path, 0.0, 0.0, seed=0)

    assert table.classes == ("cat", "dog")
    names = sorted(Path(p).relative_to(tmp_path).as_posix() for p in table.frame["path"])
    assert names == ["cat/000.png", "cat/001.png", "dog/000.png", "dog/2024/summer/IMG_1.JPEG"]
    assert all(Path(p).is_absolute() for p in table.frame["path"])
    assert list(table.label_ids(table.frame)) == [0, 0, 1, 1]


def test_class_folder_without_images_is_named(tmp_path):
    class_folders(tmp_path, {"cat": 2, "dog": 2})
    (tmp_path / "bird").mkdir()
    (tmp_path / "fish").mkdir()
    (tmp_path / "fish" / "readme.txt").write_text("no images here")

    with pytest.raises(EmptyDatasetError, match=r"bird, fish"):
        load_image_table(tmp_path, 0.1, 0.2, seed=0)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"nowhere.*does not exist"):
        load_image_table(tmp_path / "nowhere", 0.1, 0.2, seed=0)


def test_folder_without_images_says_so(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(EmptyDatasetError, match="no images"):
        load_image_table(tmp_path, 0.1, 0.2, seed=0)
    (tmp_path / "cat").rmdir()
    with pytest.raises(EmptyDatasetError, match="no images"):
        load_image_table(tmp_path, 0.1, 0.2, seed=0)


# --- splitting --------------------------------------------------------------------------------


def test_split_is_seeded_stratified_and_disjoint(tmp_path):
    table = load_image_table(class_folders(tmp_path, {"a": 20, "b": 30, "c": 10}), 0.1, 0.2, 7)

    counts = table.frame.groupby(["label", "split"]).size().unstack()
    assert counts.to_dict("index") == {
        "a": {"test": 4, "train": 14, "val": 2},
        "b": {"test": 6, "train": 21, "val": 3},
        "c": {"test": 2, "train": 7, "val": 1},
    }
    parts = [set(table.split(name)["path"]) for name in ("train", "val", "test")]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 60
    same = load_image_table(tmp_path, 0.1, 0.2, 7)
    other = load_image_table(tmp_path, 0.1, 0.2, 8)
    pd.testing.assert_frame_equal(same.frame, table.frame)
    assert set(other.split("test")["path"]) != set(table.split("test")["path"])


def test_split_of_a_class_does_not_move_when_a_class_is_added(tmp_path):
    before = load_image_table(class_folders(tmp_path, {"b": 12, "c": 12}), 0.25, 0.25, 1)
    after = load_image_table(class_folders(tmp_path, {"a": 12}), 0.25, 0.25, 1)
    assert set(after.split("test")["path"]) > set(before.split("test")["path"])


def test_every_class_keeps_a_training_image(tmp_path):
    table = load_image_table(class_folders(tmp_path, {"rare": 1, "few": 2}), 0.4, 0.5, 0)
    train = table.split("train")
    assert set(train["label"]) == {"rare", "few"}


def test_fractions_must_leave_training_data(tmp_path):
    with pytest.raises(ValueError, match="sum below 1"):
        load_image_table(class_folders(tmp_path, {"a": 3}), 0.5, 0.5, 0)


# --- manifests --------------------------------------------------------------------------------


def test_manifest_keeps_its_split_and_resolves_relative_and_absolute_paths(tmp_path):
    save_image(tmp_path / "imgs" / "1.png", "rgb")
    save_image(tmp_path / "imgs" / "2.jpg", "jpeg")
    elsewhere = save_image(tmp_path / "other" / "3.png", "grey")
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / "data.csv"
    manifest.write_text(
        f"path,label,split\n../imgs/1.png,x,train\n../imgs/2.jpg,y,train\n{elsewhere},y,test\n"
    )

    table = load_image_table(manifest, 0.5, 0.4, seed=0)

    assert table.classes == ("x", "y")
    assert table.frame.to_dict("list") == {
        "path": [str(tmp_path / "imgs/1.png"), str(tmp_path / "imgs/2.jpg"), str(elsewhere)],
        "label": ["x", "y", "y"],
        "split": ["train", "train", "test"],
    }


def test_folder_holding_manifest_csv_is_read_through_it(tmp_path):
    save_image(tmp_path / "images" / "train" / "cat" / "1.png", "grey")
    save_image(tmp_path / "images" / "test" / "cat" / "2.png", "grey")
    write_manifest(
        tmp_path,
        [("images/train/cat/1.png", "cat", "train"), ("images/test/cat/2.png", "cat", "test")],
    )
    table = load_image_table(tmp_path, 0.1, 0.2, seed=0)
    assert table.classes == ("cat",)
    assert list(table.frame["split"]) == ["train", "test"]


def test_manifest_without_split_is_split_by_seed(tmp_path):
    rows = []
    for i in range(10):
        save_image(tmp_path / f"{i}.png", "grey")
        rows.append((f"{i}.png", "ab"[i % 2]))
    table = load_image_table(write_manifest(tmp_path, rows, "path,label"), 0.2, 0.2, seed=0)
    assert table.frame["split"].value_counts().to_dict() == {"train": 6, "val": 2, "test": 2}


def test_manifest_names_every_missing_file(tmp_path):
    save_image(tmp_path / "here.png", "grey")
    rows = [("here.png", "a", "train"), ("gone.png", "a", "train"), ("lost.png", "b", "train")]
    with pytest.raises(DataNotFoundError, match=r"2 of 3 .*dvc pull.*gone\.png.*lost\.png"):
        load_image_table(write_manifest(tmp_path, rows), 0.1, 0.2, seed=0)


def test_manifest_names_rows_with_bad_split_values(tmp_path):
    for name in "abc":
        save_image(tmp_path / f"{name}.png", "grey")
    rows = [("a.png", "x", "train"), ("b.png", "x", "validation"), ("c.png", "x", "")]
    with pytest.raises(ManifestError, match=r"line 3: 'b\.png', line 4: 'c\.png'"):
        load_image_table(write_manifest(tmp_path, rows), 0.1, 0.2, seed=0)


def test_manifest_rejects_unsupported_types_missing_columns_and_duplicates(tmp_path):
    save_image(tmp_path / "a.png", "grey")
    (tmp_path / "b.gif").write_bytes(b"GIF89a")
    rows = [("a.png", "x", "train"), ("b.gif", "x", "train")]
    with pytest.raises(ManifestError, match=r"unsupported file types.*b\.gif"):
        load_image_table(write_manifest(tmp_path, rows), 0.1, 0.2, seed=0)
    with pytest.raises(ManifestError, match=r"lacks column.*label"):
        load_image_table(write_manifest(tmp_path, [("a.png",)], "path"), 0.1, 0.2, seed=0)
    rows = [("a.png", "x", "train"), ("./a.png", "x", "test")]
    with pytest.raises(ManifestError, match="more than once"):
        load_image_table(write_manifest(tmp_path, rows), 0.1, 0.2, seed=0)


def test_class_without_training_images_is_named(tmp_path):
    for name in "abc":
        save_image(tmp_path / f"{name}.png", "grey")
    rows = [("a.png", "cat", "train"), ("b.png", "dog", "test"), ("c.png", "eel", "val")]
    with pytest.raises(EmptyDatasetError, match=r"dog, eel have no training images"):
        load_image_table(write_manifest(tmp_path, rows), 0.1, 0.2, seed=0)


# --- checking files ---------------------------------------------------------------------------


def test_check_images_lists_every_undecodable_file(tmp_path):
    class_folders(tmp_path, {"good": 3})
    png = save_image(tmp_path / "bad" / "ok.png", "rgb").read_bytes()
    jpg = save_image(tmp_path / "bad" / "ok.jpg", "jpeg", (40, 40)).read_bytes()
    (tmp_path / "bad" / "truncated.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "bad" / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (tmp_path / "bad" / "text.png").write_text("hello")
    (tmp_path / "bad" / "empty.jpeg").write_bytes(b"")
    flipped = bytearray(png)
    flipped[-20] ^= 0xFF  # inside the image data: only its checksum notices
    (tmp_path / "bad" / "flipped.png").write_bytes(bytes(flipped))
    Image.new("L", (4, 4)).save(tmp_path / "bad" / "tiff.png", format="TIFF")
    table = load_image_table(tmp_path, 0.0, 0.0, seed=0)

    with pytest.raises(UndecodableImagesError) as caught:
        check_images(table)

    bad_names = {"truncated.png", "truncated.jpg", "text.png", "empty.jpeg", "flipped.png"}
    bad_names.add("tiff.png")
    assert {Path(p).name for p in caught.value.bad} == bad_names
    message = str(caught.value)
    assert all(name in message for name in bad_names)
    assert "TIFF content" in message
    assert find_undecodable_images([]) == {}


def with_bad_files(root: Path) -> set[str]:
    """Three undecodable files among the classes' images: text, a cut PNG, an empty JPEG."""
    (root / "a" / "notes.png").write_text("not an image")
    (root / "b" / "cut.png").write_bytes((root / "b" / "000.png").read_bytes()[:30])
    (root / "b" / "empty.jpg").write_bytes(b"")
    return {
        str(root / "a" / "notes.png"),
        str(root / "b" / "cut.png"),
        str(root / "b" / "empty.jpg"),
    }


def test_skip_leaves_undecodable_files_out_and_lists_them(tmp_path):
    bad = with_bad_files(class_folders(tmp_path, {"a": 4, "b": 4}))
    table = load_image_table(tmp_path, 0.25, 0.25, seed=0)
    with pytest.raises(UndecodableImagesError) as caught:
        check_images(table, "fail")
    assert set(caught.value.bad) == bad and all(path in str(caught.value) for path in bad)
    assert "on_bad_images" in str(caught.value)

    kept = check_images(table, "skip")

    assert {path for path, _ in kept.skipped} == bad
    assert all(problem for _, problem in kept.skipped)
    assert kept.classes == table.classes
    good = table.frame[~table.frame["path"].isin(bad)].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept.frame, good)  # the others keep their labels and splits
    assert check_images(kept, "fail").skipped == kept.skipped  # what is left all decodes


def test_skip_that_leaves_a_class_no_training_image_fails_naming_it(tmp_path):
    class_folders(tmp_path, {"a": 3})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_text("not an image")
    (tmp_path / "broken" / "y.png").write_bytes(b"\x89PNG")
    table = load_image_table(tmp_path, 0.0, 0.0, seed=0)
    with pytest.raises(EmptyDatasetError, match=r"broken have no training images left") as caught:
        check_images(table, "skip")
    assert "x.png" in str(caught.value) and "y.png" in str(caught.value)


def test_a_table_without_bad_files_comes_back_as_it_is(tmp_path):
    table = load_image_table(class_folders(tmp_path, {"a": 2, "b": 2}), 0.0, 0.0, seed=0)
    assert check_images(table, "skip") is table and table.skipped == ()


# --- DVC --------------------------------------------------------------------------------------

GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


def sh(*args: str, cwd: Path) -> None:
    subprocess.run(args, cwd=cwd, check=True, capture_output=True, env=os.environ | GIT_ENV)


@pytest.fixture(scope="module")
def dvc_origin(tmp_path_factory):
    """A git repo whose data/ folder is tracked by data.dvc and pushed to a local remote."""
    from dvc.repo import Repo

    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    root = tmp_path_factory.mktemp("dvc")
    origin, remote = root / "origin", root / "remote"
    origin.mkdir()
    remote.mkdir()
    class_folders(origin / "data" / "shapes", {"round": 3, "square": 2})
    sh("git", "init", "-q", cwd=origin)
    with contextlib.chdir(origin), Repo.init(".") as repo:
        repo.add(["data"])
        with repo.config.edit() as config:
            config["remote"]["storage"] = {"url": os.fspath(remote)}
            config["core"]["remote"] = "storage"
        repo.push()
    sh("git", "add", "-A", cwd=origin)
    sh("git", "commit", "-qm", "data", cwd=origin)
    return origin, remote


def fresh_clone(origin: Path, tmp_path: Path, remote_url: str | None = None) -> Path:
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", os.fspath(origin), os.fspath(clone), cwd=tmp_path)
    if remote_url is not None:
        (clone / ".dvc" / "config.local").write_text(
            f"['remote \"storage\"']\n    url = {remote_url}\n"
        )
    return clone


def test_pull_data_brings_the_pinned_version_into_a_fresh_clone(dvc_origin, tmp_path):
    origin, _ = dvc_origin
    clone = fresh_clone(origin, tmp_path)
    assert not (clone / "data").exists()

    version = pull_data(clone, "data.dvc")

    pinned = yaml.safe_load((origin / "data.dvc").read_text())["outs"][0]["md5"]
    assert version.md5 == pinned and version.md5.endswith(".dir")
    assert version.path == clone / "data"
    files = sorted(p.relative_to(version.path) for p in version.path.rglob("*.png"))
    assert files == sorted(p.relative_to(origin / "data") for p in (origin / "data").rglob("*.png"))
    assert (version.path / files[0]).read_bytes() == (origin / "data" / files[0]).read_bytes()
    assert pull_data(clone, "data.dvc") == version  # a second pull is a no-op


def test_pull_data_names_a_missing_remote_folder(dvc_origin, tmp_path):
    clone = fresh_clone(dvc_origin[0], tmp_path, remote_url=os.fspath(tmp_path / "no-such-remote"))
    with pytest.raises(DvcPullError) as caught:
        pull_data(clone, "data.dvc")
    message = str(caught.value)
    assert "remote 'storage'" in message and "no-such-remote" in message
    assert "does not exist" in message and "dvc push" in message and "dvc remote list" in message


def test_pull_data_says_when_the_remote_lacks_the_data(dvc_origin, tmp_path):
    (tmp_path / "empty-remote").mkdir()
    clone = fresh_clone(dvc_origin[0], tmp_path, remote_url=os.fspath(tmp_path / "empty-remote"))
    with pytest.raises(DvcPullError, match=r"does not hold this version.*dvc push"):
        pull_data(clone, "data.dvc")


def test_pull_data_reports_remote_missing_some_objects(dvc_origin, tmp_path):
    partial = tmp_path / "partial-remote"
    shutil.copytree(dvc_origin[1], partial)
    next(p for p in partial.rglob("*") if p.is_file() and p.suffix != ".dir").unlink()
    clone = fresh_clone(dvc_origin[0], tmp_path, remote_url=os.fspath(partial))
    with pytest.raises(DvcPullError, match=r"remote 'storage'.*failed to download"):
        pull_data(clone, "data.dvc")


def test_missing_dvc_file_is_named(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"data\.dvc does not exist.*dvc add"):
        pull_data(tmp_path, "data.dvc")


def test_data_version_refuses_a_workspace_that_differs_from_the_pin(dvc_origin, tmp_path):
    clone = fresh_clone(dvc_origin[0], tmp_path)
    version = pull_data(clone, "data.dvc")
    assert data_version(clone, "data.dvc") == version
    next(version.path.rglob("*.png")).write_bytes(b"changed")
    with pytest.raises(
        DataVersionMismatchError,
        match=r"not the version data\.dvc pins.*data modified.*dvc checkout data\.dvc",
    ):
        data_version(clone, "data.dvc")
