"""A version's predictions on the held-out test images: computed once, kept on its run, read back."""

from __future__ import annotations

import hashlib
import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

from tasks.data.stream import image_dataset
from tasks.inference.evaluate import Evaluation, score_predictions
from tasks.inference.forward import forward_pass
from tasks.registry.versions import ModelVersionRef, load_keras_model
from tasks.runtime.run_log import run_logger


@dataclass(frozen=True)
class HeldOutPredictions:
    """A model's class probabilities for every test image, with the true class ids."""

    probabilities: np.ndarray
    labels: np.ndarray

    @property
    def predicted(self) -> np.ndarray:
        return np.argmax(self.probabilities, axis=-1)


def version_predictions(
    uri: str, version: ModelVersionRef, table, batch_size: int
) -> HeldOutPredictions | None:
    """A registered version's predictions on this test split, or None when it has other classes.

    They are kept as an artifact of the version's run, named by the version and the test images'
    contents, so a version is run over a test set once: the gate of the retrain after the one
    that registered it reads them back (checked against the split's labels) instead.
    """
    classes = json.loads(version.tags.get("classes", "null") or "null")
    if classes is not None and tuple(classes) != tuple(table.classes):
        return None
    frame = table.split("test")
    labels = table.label_ids(frame)
    stored = _stored_predictions(uri, version, frame, labels, len(table.classes))
    if stored is not None:
        return stored
    model = load_keras_model(version.uri, uri)
    if model.output_shape[-1] != len(table.classes):
        return None
    size = int(model.input_shape[1])
    test = image_dataset(frame, table.classes, size, batch_size)
    probabilities, labels = forward_pass(model, test, len(frame), f"v{version.version}: test")
    predictions = HeldOutPredictions(probabilities, labels)
    _store_predictions(uri, version, frame, predictions)
    return predictions


PREDICTIONS_FOLDER = "gate_predictions"


def predictions_artifact(version: ModelVersionRef, frame) -> str:
    """Where a version's predictions for these test images are kept on its run: named by the
    version and a sha256 of every image's bytes and label, so other images, or the same paths
    with other contents, never read them."""
    digest = hashlib.sha256(f"{version.name}\0{version.version}\n".encode())
    for path, label in frame[["path", "label"]].itertuples(index=False):
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
        digest.update(f"{label}\n".encode())
    return f"{PREDICTIONS_FOLDER}/v{version.version}-{digest.hexdigest()[:16]}.npz"


def _stored_predictions(
    uri: str, version: ModelVersionRef, frame, labels: np.ndarray, class_count: int
) -> HeldOutPredictions | None:
    if version.run_id is None:
        return None
    client = MlflowClient(uri)
    artifact = predictions_artifact(version, frame)
    listed = {item.path for item in client.list_artifacts(version.run_id, PREDICTIONS_FOLDER)}
    if artifact not in listed:
        return None
    with tempfile.TemporaryDirectory(prefix="gate-") as folder:
        path = client.download_artifacts(version.run_id, artifact, folder)
        problem: str | None
        try:
            with np.load(path, allow_pickle=False) as saved:
                probabilities, saved_labels = saved["probabilities"], saved["labels"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            problem = f"unreadable ({error})"
        else:
            problem = _predictions_problem(probabilities, saved_labels, labels, class_count)
    if problem is None:
        run_logger().info(
            "v%s's predictions on the %d test images: read from its run %s",
            version.version,
            len(labels),
            version.run_id,
        )
        return HeldOutPredictions(probabilities, saved_labels)
    run_logger().warning(
        "v%s's stored test predictions %s on run %s are %s; running the model over the test "
        "images again.",
        version.version,
        artifact,
        version.run_id,
        problem,
    )
    return None


def _predictions_problem(
    probabilities: np.ndarray, saved: np.ndarray, labels: np.ndarray, class_count: int
) -> str | None:
    if probabilities.shape != (len(labels), class_count):
        return f"of shape {probabilities.shape}, not {(len(labels), class_count)}"
    if not np.array_equal(saved, labels):
        return "for other labels than this test split's"
    if not np.isfinite(probabilities).all():
        return "not all finite"
    return None


def keep_scored_predictions(
    uri: str, version: ModelVersionRef, table, evaluation: Evaluation
) -> None:
    """Keep the predictions a version's stage scored the test split with as the version's, so
    neither this gate nor the next retrain's runs the model over the test images again.

    Only when they are this split's, in its order: scored against its labels, they must give
    the evaluation's accuracy.
    """
    frame = table.split("test")
    probabilities, labels = evaluation.probabilities, table.label_ids(frame)
    if probabilities is None or probabilities.shape != (len(frame), len(table.classes)):
        return
    if score_predictions(probabilities, labels, table.classes).accuracy != evaluation.accuracy:
        return
    _store_predictions(uri, version, frame, HeldOutPredictions(probabilities, labels))


def _store_predictions(
    uri: str, version: ModelVersionRef, frame, predictions: HeldOutPredictions
) -> None:
    if version.run_id is None:
        return
    artifact = predictions_artifact(version, frame)
    folder, name = artifact.rsplit("/", 1)
    with tempfile.TemporaryDirectory(prefix="gate-") as temporary:
        path = Path(temporary) / name
        np.savez(path, probabilities=predictions.probabilities, labels=predictions.labels)
        MlflowClient(uri).log_artifact(version.run_id, str(path), folder)
