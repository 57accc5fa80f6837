"""The paired gate's statistics against known values, and its modes on constructed predictions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tasks.registry.gate import (
    PairedEvidence,
    PairedPredictions,
    decide_paired,
    judge_paired,
    mcnemar_exact,
    metric_difference,
)
from tasks.registry.gate_power import PLANNED_PASS_CHANCE, non_inferiority_power
from tasks.registry.gate_report import ClassCheck, Interval, McNemar

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


def retrain(rng, labels, champion, accuracy, share=0.1):
    """A retrain of `champion`: the same answers but on a random `share` of the images, where it
    is right with probability `accuracy` (seed retrains agree on most images)."""
    redrawn = rng.random(len(labels)) < share
    return np.where(redrawn, predictions(rng, labels, accuracy), champion)


def gate(champion, challenger, labels, mode, **settings):
    pairs = PairedPredictions(labels, champion, challenger, CLASSES)
    options = {"alpha": 0.05, "margin": 0.01, "max_class_drop": 0.05, "resamples": 1000}
    return decide_paired(pairs, metric="accuracy", mode=mode, **{**options, **settings})


@pytest.fixture
def labels() -> np.ndarray:
    return np.repeat(np.arange(10), 300)  # 3000 test images, 300 per class


def test_an_equivalent_retrain_passes_non_inferiority_and_fails_superiority(labels) -> None:
    rng = np.random.default_rng(1)
    champion = predictions(rng, labels, 0.85)
    challenger = retrain(rng, labels, champion, 0.85)
    report = gate(champion, challenger, labels, "non_inferiority")
    assert report.promote and report.difference.low >= -0.01
    assert report.reason.startswith("the data show it at most 0.01 worse than the champion: its")
    report = gate(champion, challenger, labels, "superiority")
    assert not report.promote
    assert report.reason.startswith(
        "the data do not show it better than the champion by more than 0.01: its 95% lower bound"
    )


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
    low = plain.difference.low
    assert (
        plain.reason
        == f"the data show it better than the champion: its 95% lower bound {low:+.4f} is above +0"
    )
    demanding = gate(champion, challenger, labels, "superiority", margin=0.05)
    assert not demanding.promote and demanding.difference.low < 0.05
    assert "do not show it better than the champion by more than 0.05" in demanding.reason


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
    challenger = np.where(labels == 3, (labels + 1) % 10, champion)
    mended = np.flatnonzero((labels != 3) & (champion != labels))[:285]
    challenger[mended] = labels[mended]  # 255 lost on class_3, 285 won elsewhere
    report = gate(champion, challenger, labels, "non_inferiority")
    assert report.difference.low >= -0.01  # the total alone would pass
    assert not report.promote and report.dropped_classes == ["class_3"]
    assert "class_3" in report.reason and report.tags()["gate.dropped_classes"] == "class_3"
    record = json.loads(report.to_json())
    assert [row["name"] for row in record["classes"] if row["dropped"]] == ["class_3"]


def test_predictions_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="same, non-empty list"):
        PairedPredictions(np.zeros(3), np.zeros(3), np.zeros(2), ("a",))


def evidence(estimate: float, low: float, high: float, images: int = 10_000) -> PairedEvidence:
    """The evidence of a gate decision as its tags record it (no class changes)."""
    return PairedEvidence(
        "accuracy", images, 0.90, Interval(estimate, low, high), McNemar(300, 181, 1e-3), ()
    )


def test_non_inferiority_rejects_a_challenger_the_interval_shows_worse_than_the_margin() -> None:
    """The decision `make compare` once promoted: the whole interval below 0, its lower end
    past -0.01. The data do not show it at most 0.01 worse, so it is not served."""
    report = judge_paired(evidence(-0.0119, -0.0175, -0.0061), "non_inferiority", 0.01, 0.10)
    assert not report.promote
    assert report.reason == (
        "the data do not show it at most 0.01 worse than the champion: its 95% lower bound "
        "-0.0175 is below -0.01"
    )
    assert "with 95% confidence" not in report.summary()  # no claim the interval does not give


@pytest.mark.parametrize(
    ("low", "high"), [(-0.0099, -0.0012), (-0.0100, 0.0), (-0.004, 0.006), (0.002, 0.01)]
)
def test_non_inferiority_promotes_a_challenger_whose_interval_stays_within_the_margin(
    low, high
) -> None:
    """Below 0 but within -margin is what non-inferiority tolerates: at most 0.01 worse."""
    report = judge_paired(evidence((low + high) / 2, low, high), "non_inferiority", 0.01, 0.10)
    assert report.promote
    assert report.reason.startswith("the data show it at most 0.01 worse than the champion")
    tags = report.tags()
    assert (tags["gate.margin"], tags["gate.interval"]) == ("0.01", f"[{low:.6f}, {high:.6f}]")


def test_a_rejection_for_want_of_test_images_says_how_many_would_do() -> None:
    """The estimate is as good as the champion's, but 300 images leave the bound far below it."""
    report = judge_paired(evidence(0.0, -0.03, 0.03, images=300), "non_inferiority", 0.01, 0.10)
    assert not report.promote
    # The bound would have to come 0.03 -> 0.01 closer: (0.03 / 0.01)^2 = 9 times the images.
    assert "300 test images leave its bound 0.0300 below it; about 2,700 would show it" in (
        report.reason
    )


def class_change(name: str, low: float, high: float) -> ClassCheck:
    return ClassCheck(name, 30, 0.8, 0.8 + (low + high) / 2, Interval((low + high) / 2, low, high))


def test_the_per_class_check_fails_open() -> None:
    """A class of 30 test images cannot rule out a drop of 0.10 (its interval reaches past it):
    that alone rejects nothing. A drop the data show does."""
    wide = PairedEvidence(
        "accuracy",
        300,
        0.90,
        Interval(0.0, -0.004, 0.004),
        McNemar(2, 2, 1.0),
        (class_change("shirt", -0.25, 0.18), class_change("coat", -0.6, -0.3)),
    )
    report = judge_paired(wide, "non_inferiority", 0.01, 0.10)
    assert report.dropped_classes == ["coat"] and not report.promote
    assert report.reason.endswith(
        "; the data show recall dropped by more than 0.1 for coat (upper bound -0.3000)"
    )
    shirt_only = PairedEvidence(**{**wide.__dict__, "classes": wide.classes[:1]})
    assert judge_paired(shirt_only, "non_inferiority", 0.01, 0.10).promote


def test_the_test_set_check_knows_the_images_a_margin_needs() -> None:
    """At the images it names, an as-good challenger passes with the planned chance; with a
    few of them it mostly fails, and the warning says so with the numbers."""
    enough = non_inferiority_power(10_000, 0.05, 0.01, disagreement=0.06)
    # 0.06 * ((1.6449 + 1.2816) / 0.01)^2 = 5,138.5 images.
    assert enough.images_needed == 5_139 and enough.enough
    at_needed = non_inferiority_power(enough.images_needed, 0.05, 0.01, disagreement=0.06)
    assert at_needed.pass_chance == pytest.approx(PLANNED_PASS_CHANCE, abs=0.001)
    small = non_inferiority_power(300, 0.05, 0.01, disagreement=0.06)
    assert not small.enough and small.pass_chance < 0.2
    assert small.margin_needed == pytest.approx(2.9264 * math.sqrt(0.06 / 300), abs=1e-4)
    assert small.warning().startswith("registry: with 300 test images the non_inferiority gate")
    assert "About 5,139 test images would make that 90%; registry.margin 0.041 would" in (
        small.warning()
    )


def test_with_no_margin_the_test_set_check_names_a_margin_not_a_number_of_images() -> None:
    """Under a margin of 0 an as-good retrain passes only alpha of the time, however many
    test images there are: the warning must not promise that more images would help."""
    power = non_inferiority_power(1_000_000, 0.05, 0.0, disagreement=0.06)
    assert power.pass_chance == pytest.approx(0.05, abs=1e-6) and not power.enough
    assert power.images_needed is None
    warning = power.warning()
    assert "No number of test images helps with a margin of 0; registry.margin 0.001 would" in (
        warning
    )
    assert "About" not in warning
