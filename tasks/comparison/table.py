"""The comparison's results: every seed's run, each strategy's interval per budget, the winner.

A strategy's score at a budget is the mean over its seeds with an interval (tasks/comparison/intervals.py).
Strategies whose intervals overlap the best one's cannot be told apart on this evidence, so the
winner is the cheapest of them: fewest trainable parameters, then least training time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tasks.comparison.intervals import ScoreInterval, score_interval
from tasks.inference.evaluate import Evaluation
from tasks.registry.decision import PromotionDecision
from tasks.registry.versions import ModelVersionRef
from tasks.stages.preflight import LoadedConfig
from tasks.tracking.history import StageSummary
from tasks.tracking.runs import RunRef, StageRecord

SCRATCH_STAGE = "from_scratch"
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


# --- the tables and their charts -----------------------------------------------------------------


def runs_frame(outcomes: list[StrategyOutcome]) -> pd.DataFrame:
    """One row per strategy, budget and seed, in the order they were planned."""
    return pd.DataFrame([outcome.row() for outcome in outcomes], columns=list(RUN_COLUMNS))


def comparison_frame(cells: list[CellSummary]) -> pd.DataFrame:
    """One row per strategy and budget: the metrics' means and intervals over the seeds."""
    return pd.DataFrame([cell.row() for cell in cells], columns=list(COLUMNS))


def _error_bars(rows: pd.DataFrame, metric: str) -> np.ndarray:
    mean = rows[f"test_{metric}_mean"]
    return np.vstack([mean - rows[f"test_{metric}_ci_low"], rows[f"test_{metric}_ci_high"] - mean])


def comparison_figure(frame: pd.DataFrame, metric: str):
    """Bars of the mean test metric (with its interval) and of training time per strategy."""
    from matplotlib.figure import Figure

    strategies = list(dict.fromkeys(frame["strategy"]))
    budgets = sorted(frame["labels_per_class"].unique())
    positions = np.arange(len(strategies))
    width = 0.8 / len(budgets)
    figure = Figure(figsize=(4.0 + 1.4 * len(strategies), 4.6))
    score_axes, time_axes = figure.subplots(1, 2)
    for index, budget in enumerate(budgets):
        rows = frame[frame["labels_per_class"] == budget].set_index("strategy").reindex(strategies)
        offset = positions + (index - (len(budgets) - 1) / 2) * width
        label = f"{budget} per class"
        score_axes.bar(
            offset,
            rows[f"test_{metric}_mean"],
            width,
            yerr=_error_bars(rows, metric),
            capsize=2,
            label=label,
        )
        time_axes.bar(offset, rows["training_seconds"], width, label=label)
    for axes in (score_axes, time_axes):
        axes.set_xticks(positions, strategies, rotation=30, ha="right")
        axes.grid(axis="y", alpha=0.3)
    score_axes.set_ylim(0.0, 1.0)
    score_axes.set_ylabel(f"test {metric} (mean, interval)")
    score_axes.set_title(f"Test {metric} per strategy")
    score_axes.legend(title="labels", fontsize=8)
    time_axes.set_ylabel("training time (s, mean over seeds)")
    time_axes.set_title("Training time per strategy")
    figure.tight_layout()
    return figure


def data_efficiency_figure(frame: pd.DataFrame, metric: str):
    """Mean test metric against labelled images per class (log scale), a band for its interval."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    figure = Figure(figsize=(7.5, 4.8))
    axes = figure.subplots()
    for strategy, rows in frame.groupby("strategy", sort=False):
        rows = rows.sort_values("labels_per_class")
        scratch = (rows["stages"] == SCRATCH_STAGE).all()
        (line,) = axes.plot(
            rows["labels_per_class"],
            rows[f"test_{metric}_mean"],
            marker="o",
            linestyle="--" if scratch else "-",
            label=str(strategy),
        )
        axes.fill_between(
            rows["labels_per_class"],
            rows[f"test_{metric}_ci_low"],
            rows[f"test_{metric}_ci_high"],
            color=line.get_color(),
            alpha=0.15,
            linewidth=0,
        )
    budgets = sorted(frame["labels_per_class"].unique())
    axes.set_xscale("log")
    axes.set_xticks(budgets)
    axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("labelled training images per class (log scale)")
    axes.set_ylabel(f"test {metric} (mean; band: interval)")
    seeds = int(frame["seeds"].max())
    axes.set_title(
        f"Data efficiency over {seeds} seed{'s' if seeds > 1 else ''}: test score against labels"
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def table_markdown(frame: pd.DataFrame, metric: str) -> str:
    """The comparison table as markdown: mean +- std and interval; * marks the best's rivals."""
    lines = [
        f"| strategy | labels per class | seeds | test {metric} mean | std | interval | "
        "within best | trainable params | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in frame.itertuples(index=False):
        values = row._asdict()
        lines.append(
            f"| {row.strategy} | {row.labels_per_class} | {row.seeds} | "
            f"{values[f'test_{metric}_mean']:.4f} | {values[f'test_{metric}_std']:.4f} | "
            f"[{values[f'test_{metric}_ci_low']:.4f}, {values[f'test_{metric}_ci_high']:.4f}] | "
            f"{'yes' if row.within_best else ''} | {row.trainable_params:,} | "
            f"{row.training_seconds:.0f} |"
        )
    return "\n".join(lines)


def markdown_comparison(
    frame: pd.DataFrame,
    metric: str,
    winner: Winner,
    challenger: ModelVersionRef,
    decision: PromotionDecision,
    ui: str,
) -> str:
    """The comparison's outcome for the Prefect UI: the table, the winner and why, the registry."""
    outcome = "promoted to `champion`" if decision.promote else "not promoted"
    interval = winner.cell.intervals[metric]
    return "\n".join(
        [
            f"# Strategy comparison: `{winner.strategy}` wins",
            "",
            f"{winner.reason}.",
            "",
            f"{len(frame)} cells: {frame['strategy'].nunique()} strategies at "
            f"{frame['labels_per_class'].nunique()} label budgets, {int(frame['seeds'].max())} "
            f"seed(s) each; intervals are {interval.method.split(',')[0]} at the comparison's "
            "confidence. *within best*: its interval overlaps the best strategy's at that budget.",
            "",
            table_markdown(frame, metric),
            "",
            f"Registered `{challenger.name}` version {challenger.version} (seed "
            f"{winner.outcome.seed}, alias `challenger`): {outcome} — {decision.reason}.",
            "",
            "CSV and charts are on the MLflow run tagged `comparison=summary`, one nested run per "
            f"strategy and budget holds its means and intervals, and reports/ has both. MLflow UI: "
            f"`{ui}`.",
        ]
    )
