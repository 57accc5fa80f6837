"""The comparison's tables: one row per seed's run, and one per strategy and budget over its seeds.

A strategy's score at a budget is the mean over its seeds with an interval (tasks/comparison/intervals.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from conf import LoadedConfig
from tasks.comparison.intervals import ScoreInterval, score_interval
from tasks.inference.evaluate import Evaluation
from tasks.tracking.history import StageSummary
from tasks.tracking.runs import RunRef, StageRecord

METRICS = ("accuracy", "macro_f1")
RUN_COLUMNS = (
    "strategy",
    "labels_per_class",
    "seed",
    "test_accuracy",
    "test_macro_f1",
    "trainable_params",
    "training_seconds",
    "epochs",
    "stages",
    "run_id",
)
COLUMNS = (
    "strategy",
    "labels_per_class",
    "seeds",
    *(f"test_{m}_{part}" for m in METRICS for part in ("mean", "std", "ci_low", "ci_high")),
    "interval",
    "within_best",
    "trainable_params",
    "training_seconds",
    "epochs",
    "stages",
)


@dataclass(frozen=True)
class StrategyOutcome:
    """One strategy trained at one label budget with one seed: its run, stages and test scores."""

    strategy: str
    labels_per_class: int
    seed: int
    run: RunRef
    loaded: LoadedConfig
    stages: tuple[StageSummary, ...]
    final: StageRecord
    evaluation: Evaluation
    validation_loss: float | None  # the final stage's, at the epoch it kept; None without a split

    @property
    def training_seconds(self) -> float:
        return sum(s.train_seconds for s in self.stages)

    def row(self) -> dict[str, object]:
        """This run as a row of the per-seed table."""
        last = self.stages[-1]
        return {
            "strategy": self.strategy,
            "labels_per_class": self.labels_per_class,
            "seed": self.seed,
            "test_accuracy": last.test_accuracy,
            "test_macro_f1": last.test_macro_f1,
            "trainable_params": last.trainable_params,
            "training_seconds": self.training_seconds,
            "epochs": sum(s.epochs_run for s in self.stages),
            "stages": " > ".join(s.stage for s in self.stages),
            "run_id": self.run.run_id,
        }


@dataclass(frozen=True)
class CellSummary:
    """One strategy at one budget over its seeds: a mean and an interval per metric."""

    strategy: str
    labels_per_class: int
    outcomes: tuple[StrategyOutcome, ...]
    intervals: dict[str, ScoreInterval]  # by metric name
    within_best: bool  # its interval overlaps the best strategy's at this budget

    @property
    def trainable_params(self) -> int:
        return self.outcomes[0].stages[-1].trainable_params

    @property
    def training_seconds(self) -> float:
        return float(np.mean([outcome.training_seconds for outcome in self.outcomes]))

    def metrics(self) -> dict[str, float]:
        """Its figures as MLflow metrics on the cell's summary run."""
        flat: dict[str, float] = {
            "seeds": float(len(self.outcomes)),
            "labels_per_class": float(self.labels_per_class),
            "trainable_params": float(self.trainable_params),
            "training_seconds_mean": self.training_seconds,
        }
        for metric, interval in self.intervals.items():
            flat |= interval.columns(f"test_{metric}")
        return flat

    def row(self) -> dict[str, object]:
        """This cell as a row of the comparison table."""
        first = self.outcomes[0]
        row: dict[str, object] = {
            "strategy": self.strategy,
            "labels_per_class": self.labels_per_class,
            "seeds": len(self.outcomes),
        }
        for metric in METRICS:
            row |= self.intervals[metric].columns(f"test_{metric}")
        return row | {
            "interval": self.intervals["accuracy"].method,
            "within_best": self.within_best,
            "trainable_params": self.trainable_params,
            "training_seconds": self.training_seconds,
            "epochs": float(np.mean([sum(s.epochs_run for s in o.stages) for o in self.outcomes])),
            "stages": " > ".join(s.stage for s in first.stages),
        }


def summarize_cells(
    outcomes: list[StrategyOutcome], metric: str, confidence: float
) -> list[CellSummary]:
    """One summary per strategy and budget, in the order the cells were planned."""
    groups: dict[tuple[str, int], list[StrategyOutcome]] = {}
    for outcome in outcomes:
        groups.setdefault((outcome.strategy, outcome.labels_per_class), []).append(outcome)
    intervals = {
        key: {
            name: score_interval([o.evaluation for o in group], name, confidence)
            for name in METRICS
        }
        for key, group in groups.items()
    }
    best: dict[int, ScoreInterval] = {}
    for (_, budget), scored in intervals.items():
        if budget not in best or scored[metric].mean > best[budget].mean:
            best[budget] = scored[metric]
    return [
        CellSummary(
            strategy=strategy,
            labels_per_class=budget,
            outcomes=tuple(group),
            intervals=intervals[(strategy, budget)],
            within_best=intervals[(strategy, budget)][metric].overlaps(best[budget]),
        )
        for (strategy, budget), group in groups.items()
    ]


def runs_frame(outcomes: list[StrategyOutcome]) -> pd.DataFrame:
    """One row per strategy, budget and seed, in the order they were planned."""
    return pd.DataFrame([outcome.row() for outcome in outcomes], columns=list(RUN_COLUMNS))


def comparison_frame(cells: list[CellSummary]) -> pd.DataFrame:
    """One row per strategy and budget: the metrics' means and intervals over the seeds."""
    return pd.DataFrame([cell.row() for cell in cells], columns=list(COLUMNS))
