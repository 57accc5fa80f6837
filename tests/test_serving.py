"""The registered model behind MLflow's own scoring server: a PNG in, class names and probabilities out."""

from __future__ import annotations

import base64
import importlib
import json
import multiprocessing
import os
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from tasks.data.stream import image_dataset
from tasks.registry.predict import load_serving_model, predict_images
from tasks.registry.versions import load_keras_model
from tests.servers import BIN, free_port, start, stop, tail, wait_healthy
from tests.serving_models import register_serving_model, tiny_classifier

pytestmark = pytest.mark.integration

CLASSES = ["boot", "coat", "shirt"]
SIZE = 32


def write_png(path: Path) -> Path:
    """A small real photo-like PNG, not the model's input size, so serving has to resize it."""
    rows, columns = np.mgrid[0:20, 0:24]
    pixels = np.stack([rows * 12, columns * 10, (rows + columns) * 5], axis=-1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def test_mlflow_models_serve_answers_a_png_with_its_class_name_as_predict_does(
    mlflow_uri: str, tmp_path: Path
) -> None:
    model_name = "fashion"
    model = tiny_classifier(CLASSES, SIZE)
    png = write_png(tmp_path / "images" / "photo.png")
    _, version = register_serving_model(mlflow_uri, model_name, model, CLASSES, png, tmp_path)

    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # MLflow runs uvicorn
    env.pop("PYTHONPATH", None)  # the model brings its own code: none comes from this checkout
    log = tmp_path / "serve.log"
    server = start(
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{model_name}/{version.version}",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        log,
        env,
        cwd=tmp_path,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/ping", server, log, timeout=120)
        request = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(png.read_bytes()).decode("ascii")]],
            }
        }
        response = post_json(f"http://127.0.0.1:{port}/invocations", request)
    except BaseException:
        print(tail(log))
        raise
    finally:
        stop(server)
    print(json.dumps(request), json.dumps(response), sep="\n")  # shown with -s: the exchange

    [answer] = response["predictions"]
    assert list(answer) == ["label", "probability", *CLASSES]
    assert answer["label"] in CLASSES
    assert 1 / len(CLASSES) < answer["probability"] <= 1
    assert answer["probability"] == max(answer[cls] for cls in CLASSES)
    assert sum(answer[cls] for cls in CLASSES) == pytest.approx(1.0, abs=1e-5)

    # The same answer as `transferflow predict` gives for the file...
    served = load_serving_model(f"models:/{model_name}/{version.version}", mlflow_uri)
    [predicted] = predict_images(served, [str(png)], batch_size=8).itertuples()
    assert predicted.label == answer["label"]
    assert predicted.probability == pytest.approx(answer["probability"], abs=1e-6)
    # ...and as the trained Keras model, on the pipeline's own decoding of the file.
    frame = pd.DataFrame({"path": [str(png)], "label": "x"})
    images, _ = next(iter(image_dataset(frame, ["x"], SIZE, 1)))
    expected = np.asarray(model(images, training=False))[0]
    assert [answer[cls] for cls in CLASSES] == pytest.approx(expected.tolist(), abs=1e-5)
    # The version shows clients a request to copy: this very PNG, in the format sent above.
    stored = MlflowClient(mlflow_uri).get_model_version_download_uri(model_name, version.version)
    example = json.loads((Path(urlparse(stored).path) / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["image"]
    assert base64.b64decode(example["dataframe_split"]["data"][0][0]) == png.read_bytes()
    # The registered version still gives Keras users their Keras model.
    keras_model = load_keras_model(version.uri, mlflow_uri)
    np.testing.assert_allclose(keras_model(images, training=False)[0], expected, atol=1e-6)


def test_a_serving_model_registered_before_tasks_had_packages_still_unpickles():
    """Versions registered earlier pickled their class as `tasks.serving_model.ImageClassifier`;
    in the pipeline's own process that name must still resolve, or the gate cannot load the
    champion it compares against."""
    import pickle

    from tasks.registry.serving_model import ImageClassifier

    current = pickle.dumps(ImageClassifier, protocol=0)
    assert b"tasks.registry.serving_model" in current
    registered_earlier = current.replace(b"tasks.registry.serving_model", b"tasks.serving_model")
    assert pickle.loads(registered_earlier) is ImageClassifier


def _import_in_child(module: str) -> None:
    importlib.import_module(module)


def test_a_worker_started_after_a_serving_model_loads_imports_the_whole_project(
    mlflow_uri: str, tmp_path: Path
) -> None:
    """Loading a serving model puts its shipped code (a partial `tasks` package) on sys.path; a
    comparison worker spawned after the gate's load check must still import the project's own
    modules, or every cell's process dies at start."""
    png = write_png(tmp_path / "images" / "photo.png")
    model = tiny_classifier(CLASSES, SIZE)
    _, version = register_serving_model(mlflow_uri, "after-load", model, CLASSES, png, tmp_path)
    load_serving_model(f"models:/after-load/{version.version}", mlflow_uri)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_import_in_child, "tasks.comparison.cells").result(timeout=300)
