"""The paired gate's statistics against known values, and its modes on constructed predictions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tasks.gate import PairedPredictions, decide_paired, mcnemar_exact, metric_difference

CLASSES = tuple(f"class_{index}" for index in range(10))


def test_mcnemar_matches_the_binomial_table_by_hand() -> None:
    # 10 images only the champion gets right, 2 only the challenger, 30 both, 8 neither.
    champion = np.array([True] * 10 + [False] * 2 + [True] * 30 + [False] * 8)
    challenger = np.array([False] * 10 + [True] * 2 + [True] * 30 + [False] * 8)
    result = mcnemar_exact(champion, challenger)
    assert (result.champion_only, result.challenger_only) == (10, 2)
    # Two-sided: 2 * P(X <= 2) for X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096.
    assert result.p_value == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(champion, champion).p_value == 1.0


def test_paired_bootstrap_finds_a_difference_whose_answer_is_known() -> None:
    """The challenger is right on every image, the champion on every other one: the accuracy
    difference is 0.5, with standard error sqrt(0.25 / n) over the images."""
    n = 2000
    labels = np.zeros(n, dtype=int)
    champion = np.where(np.arange(n) % 2 == 0, 0, 1)
    pairs = PairedPredictions(labels, champion, labels.copy(), ("a", "b"))
    interval = metric_difference(pairs, "accuracy", confidence=0.90, resamples=4000)
    assert interval.estimate == 0.5
    half_width = 1.6449 * math.sqrt(0.25 / n)
    assert interval.low == pytest.approx(0.5 - half_width, abs=0.004)
    assert interval.high == pytest.approx(0.5 + half_width, abs=0.004)


def test_identical_models_differ_by_exactly_nothing() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 500)
    predicted = np.where(rng.random(500) < 0.8, labels, rng.integers(0, 10, 500))
    pairs = PairedPredictions(labels, predicted, predicted.copy(), CLASSES)
    for metric in ("accuracy", "macro_f1"):
        interval = metric_difference(pairs, metric, confidence=0.9)
        assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)


def predictions(rng, labels, accuracy, wrong_class=None):
    """Predictions right with probability `accuracy` (never right on `wrong_class`)."""
    right = rng.random(len(labels)) < accuracy
    if wrong_class is not None:
        right &= labels != wrong_class
    shifted = (labels + rng.integers(1, 10, len(labels))) % 10
    return np.where(right, labels, shifted)


def gate(champion, challenger, labels, mode, **settings):
    pairs = PairedPredictions(labels, champion, challenger, CLASSES)
    options = {"alpha": 0.05, "margin": 0.01, "max_class_drop": 0.05, "resamples": 1000}
    return decide_paired(pairs, metric="accuracy", mode=mode, **{**options, **settings})


@pytest.fixture
def labels() -> np.ndarray:
    return np.repeat(np.arange(10), 300)  # 3000 test images, 300 per class


def test_an_equivalent_retrain_passes_non_inferiority_and_fails_superiority(labels) -> None:
    rng = np.random.default_rng(1)
    champion, challenger = predictions(rng, labels, 0.85), predictions(rng, labels, 0.85)
    assert gate(champion, challenger, labels, "non_inferiority").promote
    report = gate(champion, challenger, labels, "superiority")
    assert not report.promote and "not shown better" in report.reason


def test_a_clearly_better_challenger_passes_both_modes(labels) -> None:
    rng = np.random.default_rng(2)
    champion, challenger = predictions(rng, labels, 0.80), predictions(rng, labels, 0.90)
    for mode in ("non_inferiority", "superiority"):
        report = gate(champion, challenger, labels, mode)
        assert report.promote and report.difference.low > 0
        assert report.mcnemar.p_value < 1e-6


def test_superiority_asks_for_more_than_the_margin(labels) -> None:
    rng = np.random.default_rng(5)
    champion, challenger = predictions(rng, labels, 0.84), predictions(rng, labels, 0.87)
    plain = gate(champion, challenger, labels, "superiority", margin=0.0)
    assert plain.promote and plain.difference.low > 0
    assert plain.reason.startswith("better than the champion with 95% confidence")
    demanding = gate(champion, challenger, labels, "superiority", margin=0.05)
    assert not demanding.promote and demanding.difference.low < 0.05
    assert "not shown better than the champion by more than 0.05" in demanding.reason


def test_a_clearly_worse_challenger_fails_both_modes(labels) -> None:
    rng = np.random.default_rng(3)
    champion, challenger = predictions(rng, labels, 0.90), predictions(rng, labels, 0.80)
    for mode in ("non_inferiority", "superiority"):
        report = gate(champion, challenger, labels, mode)
        assert not report.promote and report.difference.high < -0.01


def test_a_class_that_collapses_is_named_even_when_the_total_holds(labels) -> None:
    """Better everywhere except class_3, which the challenger never gets right: accuracy is
    about the same, non-inferiority alone would pass, the per-class check stops it."""
    rng = np.random.default_rng(4)
    champion = predictions(rng, labels, 0.85)
    challenger = predictions(rng, labels, 0.94, wrong_class=3)
    report = gate(champion, challenger, labels, "non_inferiority")
    assert report.difference.high >= -0.01  # the total alone would pass
    assert not report.promote and report.dropped_classes == ["class_3"]
    assert "class_3" in report.reason and report.tags()["gate.dropped_classes"] == "class_3"
    record = json.loads(report.to_json())
    assert [row["name"] for row in record["classes"] if row["dropped"]] == ["class_3"]


def test_predictions_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="same, non-empty list"):
        PairedPredictions(np.zeros(3), np.zeros(3), np.zeros(2), ("a",))
