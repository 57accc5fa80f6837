"""Intervals of a comparison's scores, and the winner rule that respects them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from conf import LoadedConfig, load_config
from tasks.comparison.intervals import on_test_set, over_seeds
from tasks.comparison.table import summarize_cells
from tasks.comparison.winner import pick_winner
from tasks.inference.evaluate import score_predictions
from tasks.tracking.history import StageSummary
from tasks.tracking.runs import RunRef, StageRecord

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("bag", "coat", "shirt", "shoe")


def evaluation(accuracy: float, images: int = 10_000, seed: int = 0):
    """Real scores of predictions right on exactly `accuracy` of `images` balanced test images."""
    labels = np.arange(images) % len(CLASSES)
    predicted = labels.copy()
    wrong = np.random.default_rng(seed).permutation(images)[: round(images * (1 - accuracy))]
    predicted[wrong] = (labels[wrong] + 1) % len(CLASSES)
    return score_predictions(np.eye(len(CLASSES))[predicted], labels, CLASSES)


def test_over_seeds_is_students_t_on_the_seeds_scores() -> None:
    interval = over_seeds([0.80, 0.82, 0.84], confidence=0.95)
    half = 4.302653 * 0.02 / math.sqrt(3)  # t(0.975, 2 degrees of freedom), from a t table
    assert interval.mean == pytest.approx(0.82) and interval.std == pytest.approx(0.02)
    assert (interval.low, interval.high) == pytest.approx((0.82 - half, 0.82 + half), abs=1e-6)
    assert interval.seeds == 3 and interval.method == "t over 3 seeds"
    same = over_seeds([0.7, 0.7], confidence=0.95)
    assert (same.low, same.high) == (0.7, 0.7)
    with pytest.raises(ValueError, match="at least 2"):
        over_seeds([0.7], confidence=0.95)


def test_one_seed_gets_the_wilson_interval_of_its_test_set() -> None:
    interval = on_test_set(evaluation(0.8), "accuracy", confidence=0.95)
    p, n, z = 0.8, 10_000, 1.959964
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    assert (interval.low, interval.high) == pytest.approx((centre - half, centre + half), abs=1e-5)
    assert interval.high - interval.low == pytest.approx(0.0157, abs=2e-4)
    assert interval.method == "Wilson, 10000 test images"


def test_one_seeds_macro_f1_interval_is_a_bootstrap_over_its_test_images() -> None:
    # Every error sends a class to the next one: each class's F1 equals the accuracy, so the
    # bootstrap interval of macro-F1 must come out close to the binomial one of accuracy.
    scores = evaluation(0.8)
    assert scores.macro_f1 == pytest.approx(0.8, abs=1e-3)
    f1 = on_test_set(scores, "macro_f1", confidence=0.95)
    accuracy = on_test_set(scores, "accuracy", confidence=0.95)
    assert f1.low == pytest.approx(accuracy.low, abs=3e-3)
    assert f1.high == pytest.approx(accuracy.high, abs=3e-3)
    assert f1.method == "bootstrap over 10000 test images"
    perfect = on_test_set(evaluation(1.0), "macro_f1", confidence=0.95)
    assert (perfect.low, perfect.high) == (1.0, 1.0)


# --- the winner rule -----------------------------------------------------------------------------

LOADED = LoadedConfig(load_config(ROOT / "conf" / "compare.yaml"), ROOT)


def outcome(strategy, budget, seed, accuracy, params, seconds=10.0, validation_loss=0.5):
    from tasks.comparison.table import StrategyOutcome

    scores = evaluation(accuracy, seed=seed)
    stage = StageSummary(strategy, scores.accuracy, scores.macro_f1, params, 1e-3, 5, seconds)
    return StrategyOutcome(
        strategy=strategy,
        labels_per_class=budget,
        seed=seed,
        run=RunRef(f"{strategy}-{budget}-{seed}", "0", "sqlite:///unused.db"),
        loaded=LOADED,
        stages=(stage,),
        final=StageRecord(strategy, f"{strategy}-{budget}-{seed}-stage", None),
        evaluation=scores,
        validation_loss=validation_loss,
    )


def test_the_cheapest_strategy_within_the_best_ones_interval_wins() -> None:
    outcomes = [
        outcome("fine_tune_3", 100, 1, 0.818, 200_778),
        outcome("fine_tune_3", 100, 2, 0.822, 200_778),
        outcome("fine_tune_3", 100, 3, 0.826, 200_778),
        outcome("feature_extraction", 100, 1, 0.815, 2_570),
        outcome("feature_extraction", 100, 2, 0.820, 2_570),
        outcome("feature_extraction", 100, 3, 0.817, 2_570),
        outcome("from_scratch", 100, 1, 0.650, 215_642),
        outcome("from_scratch", 100, 2, 0.655, 215_642),
        outcome("from_scratch", 100, 3, 0.660, 215_642),
        outcome("fine_tune_3", 10, 1, 0.70, 200_778),
        outcome("fine_tune_3", 10, 2, 0.71, 200_778),
        outcome("fine_tune_3", 10, 3, 0.72, 200_778),
    ]
    cells = summarize_cells(outcomes, "accuracy", confidence=0.95)
    within = {(c.strategy, c.labels_per_class): c.within_best for c in cells}
    assert within == {
        ("fine_tune_3", 100): True,
        ("feature_extraction", 100): True,
        ("from_scratch", 100): False,
        ("fine_tune_3", 10): True,
    }
    winner = pick_winner(cells, "accuracy")
    assert winner.strategy == "feature_extraction"
    assert winner.reason.startswith("feature_extraction: accuracy 0.8173 [")
    assert "within the interval of the best, fine_tune_3 (0.8220" in winner.reason
    assert "78x cheaper (2,570 trainable parameters, not 200,778)" in winner.reason


def test_a_clearly_better_strategy_wins_however_much_it_costs() -> None:
    outcomes = [
        outcome("fine_tune_3", 100, seed, accuracy, 200_778)
        for seed, accuracy in ((1, 0.850), (2, 0.852), (3, 0.851))
    ] + [
        outcome("feature_extraction", 100, seed, accuracy, 2_570)
        for seed, accuracy in ((1, 0.815), (2, 0.817), (3, 0.816))
    ]
    winner = pick_winner(summarize_cells(outcomes, "accuracy", 0.95), "accuracy")
    assert winner.strategy == "fine_tune_3"
    assert "no other strategy's t over 3 seeds interval overlaps it" in winner.reason


def test_the_registered_seed_is_the_one_with_the_lowest_validation_loss() -> None:
    outcomes = [
        outcome("feature_extraction", 100, 1, 0.830, 2_570, validation_loss=0.51),
        outcome("feature_extraction", 100, 2, 0.815, 2_570, validation_loss=0.47),
        outcome("feature_extraction", 100, 3, 0.820, 2_570, validation_loss=0.49),
    ]
    winner = pick_winner(summarize_cells(outcomes, "accuracy", 0.95), "accuracy")
    assert winner.outcome.seed == 2  # not seed 1, which scored best on the test set
    assert winner.notes()["seed"] == "2"
    assert winner.notes()["comparison.winner_reason"] == winner.reason


def test_with_one_seed_a_difference_inside_the_test_sets_noise_does_not_decide() -> None:
    outcomes = [
        outcome("fine_tune_1", 100, 42, 0.8157, 104_330),
        outcome("fine_tune_2", 100, 42, 0.8130, 139_402),
        outcome("feature_extraction", 100, 42, 0.8139, 2_570),
    ]
    cells = summarize_cells(outcomes, "accuracy", 0.95)
    assert all(cell.within_best for cell in cells)
    assert cells[0].intervals["accuracy"].method == "Wilson, 10000 test images"
    assert pick_winner(cells, "accuracy").strategy == "feature_extraction"
