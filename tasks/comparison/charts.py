"""How the comparison table is shown: its bar and data-efficiency charts, and its markdown."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tasks.comparison.winner import Winner
from tasks.registry.decision import PromotionDecision
from tasks.registry.versions import ModelVersionRef

SCRATCH_STAGE = "from_scratch"


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
