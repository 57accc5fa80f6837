"""Batch prediction with a registered model: the real flow, MLflow pyfunc and Prefect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from tests.serving_models import log_keras_model, register_serving_model, tiny_classifier

CLASSES = ["boot", "coat", "shirt"]
SIZE = 32


@pytest.fixture
def registered(server_uri: str, unique_name: str, tmp_path: Path):
    """The pipeline's classifier on the tracking server, registered twice and wrapped for serving
    the second time, as the training flow registers it; v2 is the champion.

    v1 is the plain tensorflow-flavor model that versions registered before serving models were.
    """
    from tasks.registry.hand_moves import promote_version
    from tasks.registry.versions import register_challenger

    model = tiny_classifier(CLASSES, SIZE)
    example = tmp_path / "example.png"
    Image.new("RGB", (SIZE, SIZE), (90, 120, 30)).save(example)
    run_id, keras_uri = log_keras_model(server_uri, unique_name, model, tmp_path)
    register_challenger(server_uri, keras_uri, unique_name, run_id, {})
    register_serving_model(server_uri, unique_name, model, CLASSES, example, tmp_path)
    promote_version(server_uri, unique_name, 2, "test")
    return model


def write_images(folder: Path) -> list[Path]:
    """Images in every mode the pipeline accepts, some in nested folders, plus files to skip."""
    rng = np.random.default_rng(1)

    def pixels(shape, low, high, dtype=np.uint8):  # each image its own brightness and contrast
        return rng.integers(low, high, shape, dtype=dtype)

    images = {
        folder / "a" / "rgb.png": Image.fromarray(pixels((40, 50, 3), 0, 256)),
        folder / "a" / "grey.jpg": Image.fromarray(pixels((40, 50), 150, 256)),
        folder / "b" / "deeper" / "rgba.PNG": Image.fromarray(pixels((30, 30, 4), 0, 100)),
        folder / "palette.png": Image.fromarray(pixels((40, 50, 3), 100, 140)).convert("P"),
        folder / "sixteen_bit.png": Image.fromarray(pixels((20, 20), 0, 30000, np.uint16)),
        folder / "big.jpeg": Image.fromarray(pixels((300, 200, 3), 200, 256)),
    }
    for path, image in images.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    (folder / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(folder / "a" / ".hidden.png")
    return sorted(images)


def expected_predictions(model, paths: list[Path]) -> dict[str, tuple[int, float]]:
    """The same model run directly on the pipeline's decoding of each image, one at a time."""
    from tasks.data.stream import image_dataset

    frame = pd.DataFrame({"path": [str(p) for p in paths], "label": "x"})
    found = {}
    for path, (image, _) in zip(frame["path"], image_dataset(frame, ["x"], SIZE, 1), strict=True):
        probabilities = np.asarray(model(image, training=False))[0]
        found[path] = (int(probabilities.argmax()), float(probabilities.max()))
    return found


@pytest.mark.integration
def test_predict_writes_a_class_name_and_probability_for_every_image(
    registered, unique_name: str, tmp_path: Path
) -> None:
    paths = write_images(tmp_path / "images")
    output = tmp_path / "out" / "predictions.csv"
    done = CliRunner().invoke(
        app,
        [
            "predict",
            "--model",
            f"models:/{unique_name}@champion",
            "--images",
            str(tmp_path / "images"),
            "--output",
            str(output),
            "--batch-size",
            "4",  # six images: one full batch and a short one
        ],
    )
    assert done.exit_code == 0, done.output
    assert (
        f"Wrote 6 predictions by {unique_name} version 2 (models:/{unique_name}@champion)"
        in done.output
    )

    table = pd.read_csv(output)
    assert list(table.columns) == ["path", "label", "probability"]
    assert sorted(table["path"]) == [str(p) for p in paths]
    expected = expected_predictions(registered, paths)
    for row in table.itertuples():
        index, probability = expected[row.path]
        assert row.label == CLASSES[index]
        assert row.probability == pytest.approx(probability, abs=1e-4)
        assert 1 / len(CLASSES) - 1e-6 <= row.probability <= 1
    # Distinct outputs per image, so rows swapped or labels shifted would show.
    assert table["label"].nunique() > 1 and table["probability"].nunique() == len(table)

    # A version registered before serving models is refused, saying what to do.
    done = CliRunner().invoke(
        app,
        ["predict", "--model", f"models:/{unique_name}/1", "--images", str(tmp_path / "images")],
    )
    assert done.exit_code == 2
    assert "does not take image files" in done.output and "transferflow train" in done.output


def test_undecodable_images_are_all_named_before_any_model_is_loaded(
    mlflow_uri: str, tmp_path: Path
) -> None:
    folder = tmp_path / "images"
    (folder / "ok").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "ok" / "fine.png")
    Image.new("RGB", (64, 64)).save(folder / "ok" / "cut.png")
    (folder / "ok" / "cut.png").write_bytes((folder / "ok" / "cut.png").read_bytes()[:60])
    (folder / "text.jpg").write_text("not a jpeg")

    done = CliRunner().invoke(
        app, ["predict", "--model", "models:/never-registered@champion", "--images", str(folder)]
    )
    assert done.exit_code == 2
    assert "2 image file(s) cannot be decoded" in done.output
    assert str(folder / "ok" / "cut.png") in done.output
    assert str(folder / "text.jpg") in done.output
    assert "never-registered" not in done.output  # the model was never looked up

    empty = tmp_path / "empty"
    empty.mkdir()
    done = CliRunner().invoke(app, ["predict", "--model", "models:/x/1", "--images", str(empty)])
    assert done.exit_code == 2 and f"no images (.png, .jpg, .jpeg) under {empty}" in done.output
