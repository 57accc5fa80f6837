"""Test-split scores match hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.inference.evaluate import confusion_matrix_figure, score_predictions

CLASSES = ("cat", "dog", "owl")


def one_hot(predicted: list[int], confidence: float = 0.8) -> np.ndarray:
    probabilities = np.full((len(predicted), 3), (1 - confidence) / 2)
    probabilities[np.arange(len(predicted)), predicted] = confidence
    return probabilities


def test_scores_match_hand_computation() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = [0, 0, 1, 1, 2, 2]
    evaluation = score_predictions(one_hot(predicted), labels, CLASSES)
    assert evaluation.accuracy == pytest.approx(4 / 6)
    assert evaluation.precision == pytest.approx((1.0, 0.5, 0.5))
    assert evaluation.recall == pytest.approx((2 / 3, 0.5, 1.0))
    f1 = [2 * p * r / (p + r) for p, r in zip((1.0, 0.5, 0.5), (2 / 3, 0.5, 1.0), strict=True)]
    assert evaluation.macro_f1 == pytest.approx(np.mean(f1))
    assert evaluation.confusion.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    expected_loss = -np.mean([np.log(0.8)] * 4 + [np.log(0.1)] * 2)
    assert evaluation.loss == pytest.approx(expected_loss)
    metrics = evaluation.metrics()
    assert metrics["test_recall/owl"] == 1.0 and metrics["test_precision/cat"] == 1.0
    table = evaluation.per_class_table().set_index("class")
    assert table["images"].tolist() == [3, 2, 1]
    assert table["f1"].tolist() == pytest.approx(f1)


def test_a_class_never_predicted_scores_zero_not_nan() -> None:
    evaluation = score_predictions(one_hot([0, 0, 0]), np.array([0, 1, 2]), CLASSES)
    assert evaluation.precision == (pytest.approx(1 / 3), 0.0, 0.0)
    assert not np.isnan(evaluation.macro_f1)


def test_mismatched_lengths_fail() -> None:
    with pytest.raises(ValueError, match="as many predictions as labels"):
        score_predictions(one_hot([0, 1]), np.array([0]), CLASSES)


def test_confusion_matrix_figure_is_labelled() -> None:
    evaluation = score_predictions(one_hot([0, 1, 2]), np.array([0, 1, 2]), CLASSES)
    figure = confusion_matrix_figure(evaluation)
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == list(CLASSES)
    assert "1.000" in axes.get_title()
