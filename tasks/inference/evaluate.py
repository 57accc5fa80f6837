"""Evaluate a classifier on the held-out test split: accuracy, macro-F1, per-class scores."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.data import DataConfig
from tasks.data.stream import image_dataset
from tasks.inference.forward import forward_pass


@dataclass(frozen=True)
class Evaluation:
    """Test-split scores of one model; `confusion[i, j]` counts true class i predicted as j.

    `probabilities`, each test image's class probabilities in the split's order, is there when
    the scores were computed in this process (not read back from a checkpoint); the promotion
    gate pairs them with the champion's instead of running the model over the images again.
    """

    classes: tuple[str, ...]
    accuracy: float
    macro_f1: float
    loss: float
    precision: tuple[float, ...]
    recall: tuple[float, ...]
    confusion: np.ndarray
    probabilities: np.ndarray | None = field(default=None, repr=False, compare=False)

    def metric(self, name: str) -> float:
        """The primary metric by its config name (`accuracy` or `macro_f1`)."""
        return float(getattr(self, name))

    def metrics(self, prefix: str = "test_") -> dict[str, float]:
        """Flat scalar metrics for tracking, per-class scores included.

        Per-class scores are named `test_recall/<class>` and `test_precision/<class>`: MLflow's
        UI groups names by what comes before the `/`, so they fold into two sections instead of
        crowding the headline charts.
        """
        flat = {
            f"{prefix}accuracy": self.accuracy,
            f"{prefix}macro_f1": self.macro_f1,
            f"{prefix}loss": self.loss,
        }
        for name, precision, recall in zip(self.classes, self.precision, self.recall, strict=True):
            flat[f"{prefix}precision/{name}"] = precision
            flat[f"{prefix}recall/{name}"] = recall
        return flat

    def per_class_table(self) -> pd.DataFrame:
        """One row per class: test images, precision, recall and F1."""
        precision, recall = np.asarray(self.precision), np.asarray(self.recall)
        return pd.DataFrame(
            {
                "class": list(self.classes),
                "images": self.confusion.sum(axis=1).astype(int),
                "precision": precision,
                "recall": recall,
                "f1": f1_scores(precision, recall),
            }
        )


def f1_scores(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """Per-class F1; 0 where precision and recall are both 0."""
    denominator = precision + recall
    return np.divide(
        2 * precision * recall, denominator, out=np.zeros(len(precision)), where=denominator > 0
    )


def score_predictions(
    probabilities: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]
) -> Evaluation:
    """Score predicted class probabilities against the true label ids."""
    if len(probabilities) != len(labels) or len(labels) == 0:
        raise ValueError(
            f"need as many predictions as labels, and some: {len(probabilities)} vs {len(labels)}"
        )
    labels = np.asarray(labels, dtype=np.int64)
    predicted = probabilities.argmax(axis=1)
    k = len(classes)
    confusion = np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    true_positive = np.diag(confusion).astype(np.float64)
    predicted_count = confusion.sum(axis=0)
    actual_count = confusion.sum(axis=1)
    # A class never predicted (or absent) scores 0 rather than NaN, as scikit-learn's zero_division=0.
    precision = np.divide(
        true_positive, predicted_count, out=np.zeros(k), where=predicted_count > 0
    )
    recall = np.divide(true_positive, actual_count, out=np.zeros(k), where=actual_count > 0)
    f1 = f1_scores(precision, recall)
    picked = probabilities[np.arange(len(labels)), labels]
    loss = float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))
    return Evaluation(
        # A tuple of its own: Prefect links every part of a task's result to later tasks whose
        # inputs hold it, and the table's own would tie every task that reads the table to this.
        classes=tuple(list(classes)),
        accuracy=float(true_positive.sum() / len(labels)),
        macro_f1=float(f1[actual_count > 0].mean()),
        loss=loss,
        precision=tuple(float(p) for p in precision),
        recall=tuple(float(r) for r in recall),
        confusion=confusion,
        probabilities=probabilities,
    )


def confusion_matrix_figure(evaluation: Evaluation, title: str = "Test confusion matrix"):
    """A labelled confusion-matrix heat map (matplotlib Figure), for MLflow's artifact view."""
    from matplotlib.figure import Figure

    # A bare Figure, not pyplot: no global figure registry to leak into, no display backend.
    k = len(evaluation.classes)
    figure = Figure(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k))
    axes = figure.subplots()
    axes.imshow(evaluation.confusion, cmap="Blues")
    axes.set_xticks(range(k), evaluation.classes, rotation=60, ha="right")
    axes.set_yticks(range(k), evaluation.classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"{title} (accuracy {evaluation.accuracy:.3f})")
    peak = evaluation.confusion.max() or 1
    for (row, column), count in np.ndenumerate(evaluation.confusion):
        color = "white" if count > peak / 2 else "black"
        axes.text(column, row, str(count), ha="center", va="center", fontsize=7, color=color)
    figure.tight_layout()
    return figure


def evaluate_model(model, dataset, count: int, classes: tuple[str, ...]) -> Evaluation:
    """Score `model` on a dataset of `count` images in (images, labels) batches."""
    probabilities, labels = forward_pass(model, dataset, count, "evaluation")
    return score_predictions(probabilities, labels, classes)


# --- Prefect steps -------------------------------------------------------------------------------


@task(name="evaluate-head-on-features", cache_policy=NO_CACHE)
def evaluate_on_features(classifier, test_features, classes: tuple[str, ...]) -> Evaluation:
    """Score the classifier through its head on cached test features: no base forward pass.

    With the base frozen and in inference mode, head(features) is exactly what the full model
    computes, so this equals evaluating on the images.
    """
    features, labels = test_features.load()
    probabilities = np.concatenate(
        [
            np.asarray(classifier.head(features[start : start + 4096], training=False))
            for start in range(0, len(features), 4096)
        ]
    )
    return score_predictions(probabilities, labels, classes)


@task(name="evaluate-on-test-images", cache_policy=NO_CACHE)
def evaluate_on_images(model, table, data: DataConfig) -> Evaluation:
    """Score the whole model on the held-out test images, decoded at `data.image_size`."""
    frame = table.split("test")
    test = image_dataset(frame, table.classes, data.image_size, data.batch_size)
    return evaluate_model(model, test, len(frame), table.classes)
