"""The Fashion-MNIST demo dataset: reproducible bytes, right counts, original pixels."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.data.demo import (
    CLASS_NAMES,
    FashionMnistNotFoundError,
    load_fashion_mnist,
    write_demo_dataset,
)
from tasks.data.table import load_image_table


@pytest.fixture(scope="module")
def fashion_mnist():
    try:
        return load_fashion_mnist()
    except FashionMnistNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not available offline: {error}")


@pytest.fixture(scope="module")
def small(fashion_mnist, tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "fm", 3, 2, 2, seed=0)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_writing_twice_gives_byte_identical_files(small, tmp_path):
    again = write_demo_dataset(tmp_path / "elsewhere", 3, 2, 2, seed=0)
    assert tree_digest(again.root) == tree_digest(small.root)
    assert len(tree_digest(small.root)) == 70 + 1


def test_files_match_the_pinned_digest(small):
    # If this moves, every user's DVC hash of the demo data moves with it (numpy's seeded draw,
    # the PNG encoder or the manifest format changed): update data.dvc and this digest together.
    combined = hashlib.md5(repr(sorted(tree_digest(small.root).items())).encode()).hexdigest()
    assert combined == "319fefaa03cb1911b9fc4b6b10e100b9"


def test_manifest_counts_per_split_and_class(small):
    manifest = pd.read_csv(small.manifest)
    assert small.counts == {"train": 30, "val": 20, "test": 20}
    assert list(manifest.columns) == ["path", "label", "split"]
    per_class = manifest.groupby(["split", "label"]).size()
    assert set(per_class.index.get_level_values("label")) == set(CLASS_NAMES)
    assert per_class["train"].eq(3).all() and per_class["val"].eq(2).all()
    assert per_class["test"].eq(2).all()
    assert all((small.root / p).is_file() for p in manifest["path"])
    assert manifest["path"].str.match(r"images/(train|val|test)/[a-z_-]+/\d{5}\.png").all()


def test_pngs_hold_the_original_pixels_and_labels(small, fashion_mnist):
    (x_train, y_train), (x_test, y_test) = fashion_mnist
    manifest = pd.read_csv(small.manifest)
    for path, label, split in manifest.itertuples(index=False):
        index = int(Path(path).stem)
        images, labels = (x_test, y_test) if split == "test" else (x_train, y_train)
        with Image.open(small.root / path) as image:
            assert image.mode == "L" and image.size == (28, 28)
            np.testing.assert_array_equal(np.asarray(image), images[index])
        assert CLASS_NAMES[labels[index]] == label


def test_test_split_is_the_first_test_images_and_train_val_are_disjoint(small, fashion_mnist):
    _, (_, y_test) = fashion_mnist
    manifest = pd.read_csv(small.manifest)
    for class_id, name in enumerate(CLASS_NAMES):
        rows = manifest[(manifest["label"] == name) & (manifest["split"] == "test")]
        expected = np.flatnonzero(y_test == class_id)[:2]
        assert [int(Path(p).stem) for p in rows["path"]] == list(expected)
    drawn = manifest[manifest["split"] != "test"]["path"].map(lambda p: Path(p).stem)
    assert drawn.is_unique


def test_another_seed_draws_other_images(small, tmp_path):
    other = write_demo_dataset(tmp_path / "fm", 3, 2, 2, seed=1)
    train = {p.name for p in (small.root / "images" / "train").rglob("*.png")}
    assert train != {p.name for p in (other.root / "images" / "train").rglob("*.png")}


def test_rewriting_removes_stale_files(fashion_mnist, tmp_path):
    first = write_demo_dataset(tmp_path / "fm", 3, 2, 2, seed=0)
    (first.root / "images" / "train" / "coat" / "stale.png").write_bytes(b"old")
    second = write_demo_dataset(tmp_path / "fm", 2, 0, 1, seed=0)
    assert second.counts == {"train": 20, "val": 0, "test": 10}
    assert len(list(second.root.rglob("*.png"))) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fm"]  # no build leftovers


def test_the_manifest_loads_as_an_image_table(small):
    table = load_image_table(small.root, val_fraction=0.5, test_fraction=0.3, seed=0)
    assert table.classes == tuple(sorted(CLASS_NAMES))
    assert table.frame["split"].value_counts().to_dict() == {"train": 30, "val": 20, "test": 20}


def test_impossible_counts_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="train_per_class"):
        write_demo_dataset(tmp_path, 0, 1, 1, seed=0)
    with pytest.raises(ValueError, match="at most 6000"):
        write_demo_dataset(tmp_path, 5000, 1001, 1, seed=0)
    with pytest.raises(ValueError, match="test_per_class"):
        write_demo_dataset(tmp_path, 1, 1, 1001, seed=0)
