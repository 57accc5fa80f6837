"""The winner rule: the cheapest strategy whose interval overlaps the best one's, and why it won.

Strategies whose intervals overlap the best one's cannot be told apart on this evidence, so the
winner is the cheapest of them: fewest trainable parameters, then least training time.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.comparison.strategies import ComparisonPlan
from tasks.comparison.table import (
    CellSummary,
    StrategyOutcome,
    comparison_frame,
    runs_frame,
    summarize_cells,
)


@dataclass(frozen=True)
class Winner:
    """The strategy to deploy, the seed's run whose model is registered, and why."""

    cell: CellSummary
    outcome: StrategyOutcome
    reason: str

    @property
    def strategy(self) -> str:
        return self.cell.strategy

    def notes(self) -> dict[str, str]:
        """What the registered version records of the comparison that chose it."""
        return {
            "strategy": self.strategy,
            "seed": str(self.outcome.seed),
            "comparison.winner_reason": self.reason,
        }


@dataclass(frozen=True)
class ComparisonSummary:
    """The comparison's results: per-cell summaries, the winner, and both tables."""

    cells: list[CellSummary]
    winner: Winner
    table: pd.DataFrame  # one row per strategy and budget
    runs: pd.DataFrame  # one row per strategy, budget and seed


def summarize_comparison_outcomes(
    outcomes: list[StrategyOutcome], metric: str, confidence: float
) -> ComparisonSummary:
    """Intervals per strategy and budget, the winner they give, and the tables to show."""
    cells = summarize_cells(outcomes, metric, confidence)
    return ComparisonSummary(
        cells, pick_winner(cells, metric), comparison_frame(cells), runs_frame(outcomes)
    )


def pick_winner(cells: list[CellSummary], metric: str) -> Winner:
    """The cheapest strategy whose interval overlaps the best one's at the largest budget.

    Cheapest is fewest trainable parameters, then least training time. Of the winner's seeds,
    the run registered is the one with the lowest validation loss (the test set stays out of
    the choice); without a validation split, the first seed's.
    """
    most = max(cell.labels_per_class for cell in cells)
    candidates = [cell for cell in cells if cell.labels_per_class == most]
    best = max(candidates, key=lambda cell: cell.intervals[metric].mean)
    within = [cell for cell in candidates if cell.within_best]
    chosen = min(within, key=lambda cell: (cell.trainable_params, cell.training_seconds))
    if all(o.validation_loss is not None for o in chosen.outcomes):
        outcome = min(chosen.outcomes, key=lambda o: o.validation_loss or 0.0)
    else:
        outcome = chosen.outcomes[0]
    return Winner(chosen, outcome, winner_reason(chosen, best, within, metric))


def winner_reason(
    chosen: CellSummary, best: CellSummary, within: list[CellSummary], metric: str
) -> str:
    """Why `chosen` won, in one line for the summary run, the registered version and the CLI."""
    mine, top = chosen.intervals[metric], best.intervals[metric]
    shown = f"{metric} {mine.mean:.4f} [{mine.low:.4f}, {mine.high:.4f}]"
    others = [cell.strategy for cell in within if cell is not chosen]
    if chosen is best:
        if not others:
            return (
                f"{chosen.strategy}: best {shown} at {chosen.labels_per_class} labels per class, "
                f"no other strategy's {mine.method} interval overlaps it"
            )
        return (
            f"{chosen.strategy}: best {shown} at {chosen.labels_per_class} labels per class, and "
            f"the cheapest of those within its interval ({', '.join(others)})"
        )
    return (
        f"{chosen.strategy}: {shown} is within the interval of the best, {best.strategy} "
        f"({top.mean:.4f} [{top.low:.4f}, {top.high:.4f}], {top.method}), and it is "
        f"{_cheaper(chosen, best)}"
    )


def _cheaper(chosen: CellSummary, best: CellSummary) -> str:
    if chosen.trainable_params < best.trainable_params:
        ratio = best.trainable_params / max(chosen.trainable_params, 1)
        return f"{ratio:.0f}x cheaper ({chosen.trainable_params:,} trainable parameters, not {best.trainable_params:,})"
    return (
        f"faster to train ({chosen.training_seconds:.0f} s, not {best.training_seconds:.0f} s, "
        "with as many trainable parameters)"
    )


@task(name="summarize-comparison", cache_policy=NO_CACHE)
def summarize_comparison(
    outcomes: list[StrategyOutcome], plan: ComparisonPlan
) -> ComparisonSummary:
    """Each strategy's mean and interval per budget over the seeds, and the winner they give."""
    return summarize_comparison_outcomes(outcomes, plan.metric, plan.confidence)
