"""How sure a comparison's scores are: an interval for each strategy at each label budget.

Over two or more seeds the interval is Student's t on the seeds' scores: it covers what the
seed decides (the labelled images drawn, the initialisation, the shuffling). One seed leaves
only the test set's own noise: a binomial (Wilson) interval for accuracy, a bootstrap over the
test images for macro-F1. A test set of 10,000 images gives accuracy to about +-0.008 at 95%.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from tasks.inference.evaluate import Evaluation
from tasks.registry.gate import metric_score, paired_bootstrap


@dataclass(frozen=True)
class ScoreInterval:
    """One metric of one strategy at one budget: its mean over the seeds and its interval."""

    mean: float
    std: float  # over the seeds; 0 for one seed
    low: float
    high: float
    seeds: int
    method: str  # how the interval was made, e.g. "t over 3 seeds"

    def overlaps(self, other: ScoreInterval) -> bool:
        return self.low <= other.high and other.low <= self.high

    def columns(self, prefix: str) -> dict[str, float]:
        """As table columns and MLflow metrics: `<prefix>_mean`, `_std`, `_ci_low`, `_ci_high`."""
        return {
            f"{prefix}_mean": self.mean,
            f"{prefix}_std": self.std,
            f"{prefix}_ci_low": self.low,
            f"{prefix}_ci_high": self.high,
        }


def over_seeds(scores: Sequence[float], confidence: float) -> ScoreInterval:
    """Mean, standard deviation and Student's t interval of two or more seeds' scores."""
    values = np.asarray(scores, dtype=np.float64)
    if len(values) < 2:
        raise ValueError(f"an interval over seeds needs at least 2 scores, got {len(values)}")
    mean, std = float(values.mean()), float(values.std(ddof=1))
    if std == 0.0:  # every seed scored the same: scipy would give NaN for a zero scale
        low = high = mean
    else:
        low, high = stats.t.interval(
            confidence, df=len(values) - 1, loc=mean, scale=std / np.sqrt(len(values))
        )
    return ScoreInterval(
        mean, std, float(low), float(high), len(values), f"t over {len(values)} seeds"
    )


def on_test_set(
    evaluation: Evaluation, metric: str, confidence: float, resamples: int = 2000, seed: int = 0
) -> ScoreInterval:
    """One model's score with the interval its test set alone allows."""
    confusion = np.asarray(evaluation.confusion)
    images = int(confusion.sum())
    score = evaluation.metric(metric)
    if metric == "accuracy":
        correct = int(np.trace(confusion))
        ci = stats.binomtest(correct, images).proportion_ci(confidence, method="wilson")
        low, high, method = ci.low, ci.high, f"Wilson, {images} test images"
    else:
        low, high = _bootstrap_test_images(confusion, metric, confidence, resamples, seed)
        method = f"bootstrap over {images} test images"
    return ScoreInterval(score, 0.0, float(low), float(high), 1, method)


def score_interval(
    evaluations: Sequence[Evaluation], metric: str, confidence: float
) -> ScoreInterval:
    """The interval of `metric` for one strategy at one budget, however many seeds it ran."""
    if len(evaluations) == 1:
        return on_test_set(evaluations[0], metric, confidence)
    return over_seeds([evaluation.metric(metric) for evaluation in evaluations], confidence)


def _bootstrap_test_images(
    confusion: np.ndarray, metric: str, confidence: float, resamples: int, seed: int
) -> tuple[float, float]:
    """Percentile interval of a metric over the test images, rebuilt from the confusion matrix."""
    count = len(confusion)
    truth, predicted = np.divmod(np.repeat(np.arange(count * count), confusion.ravel()), count)

    def statistic(labels, guesses, axis=-1):
        return metric_score(labels, guesses, metric, count)

    estimate = float(statistic(truth, predicted))
    interval = paired_bootstrap(
        (truth, predicted), statistic, estimate, confidence, resamples, seed
    )
    return interval.low, interval.high
