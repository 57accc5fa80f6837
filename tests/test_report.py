"""The files DVC reads after a run: numeric metrics, one training curve, the confusion pairs."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np

from tasks.inference.evaluate import score_predictions
from tasks.report.summary import write_dvc_reports
from tasks.tracking.history import StageSummary, TrainingHistory

CLASSES = ("cat", "dog", "owl")


def history(losses: list[float], trainable_params: int, seconds: float) -> TrainingHistory:
    return TrainingHistory(
        epochs={
            "loss": tuple(losses),
            "accuracy": tuple(1 - loss for loss in losses),
            "val_loss": tuple(loss + 0.1 for loss in losses),
            "val_accuracy": tuple(0.9 - loss for loss in losses),
        },
        best_epoch=len(losses) - 1,
        seconds=seconds,
        trainable_params=trainable_params,
        learning_rate=1e-3,
    )


def write_two_stage_reports(reports: Path):
    labels = np.array([0, 0, 0, 1, 1, 2])
    probabilities = np.full((6, 3), 0.1)
    probabilities[np.arange(6), [0, 0, 1, 1, 2, 2]] = 0.8
    evaluation = score_predictions(probabilities, labels, CLASSES)
    histories = [history([0.9, 0.7, 0.6], 3_000, 2.04), history([0.5, 0.4], 50_000, 10.0)]
    summaries = [
        StageSummary.of(name, past, evaluation)
        for name, past in zip(("feature_extraction", "fine_tune_1"), histories, strict=True)
    ]
    write_dvc_reports(reports, summaries, histories, evaluation)
    return evaluation


def test_metrics_are_the_final_models_scores_and_the_runs_cost_in_numbers(tmp_path: Path) -> None:
    evaluation = write_two_stage_reports(tmp_path / "reports")
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics == {
        "test_accuracy": evaluation.accuracy,
        "test_macro_f1": evaluation.macro_f1,
        "test_loss": evaluation.loss,
        "trainable_params": 50_000,
        "epochs": 5,
        "train_seconds": 12.0,
    }


def test_training_curve_numbers_epochs_on_across_stages(tmp_path: Path) -> None:
    write_two_stage_reports(tmp_path / "reports")
    with (tmp_path / "reports" / "training_curve.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [(row["epoch"], row["stage"]) for row in rows] == [
        ("1", "feature_extraction"),
        ("2", "feature_extraction"),
        ("3", "feature_extraction"),
        ("4", "fine_tune_1"),
        ("5", "fine_tune_1"),
    ]
    assert [float(row["loss"]) for row in rows] == [0.9, 0.7, 0.6, 0.5, 0.4]
    assert float(rows[3]["val_accuracy"]) == 0.9 - 0.5


def test_confusion_pairs_count_every_test_image_once(tmp_path: Path) -> None:
    evaluation = write_two_stage_reports(tmp_path / "reports")
    with (tmp_path / "reports" / "confusion.csv").open() as stream:
        pairs = Counter((row["actual"], row["predicted"]) for row in csv.DictReader(stream))
    assert pairs == {
        (CLASSES[actual], CLASSES[predicted]): count
        for (actual, predicted), count in np.ndenumerate(evaluation.confusion)
        if count
    }
    assert sum(pairs.values()) == 6
    assert (tmp_path / "reports" / "confusion_matrix.png").stat().st_size > 0
