"""Two strategies of one comparison, paired by seed: each one's interval and their difference's.

The comparison gives each strategy its own t interval over the seeds. Two strategies trained on
the same seeds also share each seed's labelled images and head, so the seed's luck cancels in
their difference: a t interval over the per-seed differences tells them apart where two
overlapping intervals cannot. Reads the comparison's `comparison_runs.csv` (reports/, or the
`comparison-<id>` run's artifact) and prints a markdown table:

    python bench/paired_difference.py reports/comparison_runs.csv fine_tune_2 fine_tune_2_augmented
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.comparison.intervals import ScoreInterval, over_seeds


@dataclass(frozen=True)
class PairedBudget:
    """Two strategies at one label budget: each one's interval and their paired difference's."""

    labels_per_class: int
    baseline: ScoreInterval
    treatment: ScoreInterval
    difference: ScoreInterval  # treatment minus baseline, over the seeds both ran
    per_seed: tuple[float, ...]

    @property
    def beyond_noise(self) -> bool:
        return self.difference.low > 0 or self.difference.high < 0


def paired_budgets(
    runs: pd.DataFrame, baseline: str, treatment: str, metric: str, confidence: float
) -> list[PairedBudget]:
    """Per label budget, the seeds that ran both strategies, paired."""
    budgets = []
    for budget, at_budget in runs.groupby("labels_per_class"):
        by_seed = at_budget.pivot_table(index="seed", columns="strategy", values=f"test_{metric}")
        paired = by_seed[[baseline, treatment]].dropna()
        if len(paired) < 2:
            raise SystemExit(f"{budget} labels per class: fewer than 2 seeds ran both strategies")
        differences = paired[treatment] - paired[baseline]
        budgets.append(
            PairedBudget(
                labels_per_class=int(budget),
                baseline=over_seeds(paired[baseline], confidence),
                treatment=over_seeds(paired[treatment], confidence),
                difference=over_seeds(differences, confidence),
                per_seed=tuple(float(value) for value in differences),
            )
        )
    return budgets


def _shown(interval: ScoreInterval, signed: bool = False) -> str:
    form = "{:+.4f}" if signed else "{:.4f}"
    low, high = form.format(interval.low), form.format(interval.high)
    return f"{form.format(interval.mean)} [{low}, {high}]"


def markdown(budgets: list[PairedBudget], baseline: str, treatment: str) -> str:
    lines = [
        f"| labels per class | seeds | {baseline} | {treatment} | difference (paired) "
        "| per seed | beyond noise |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in budgets:
        per_seed = ", ".join(f"{value:+.4f}" for value in row.per_seed)
        lines.append(
            f"| {row.labels_per_class} | {row.difference.seeds} | {_shown(row.baseline)} "
            f"| {_shown(row.treatment)} | {_shown(row.difference, signed=True)} "
            f"| {per_seed} | {'yes' if row.beyond_noise else 'no'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="a comparison's comparison_runs.csv")
    parser.add_argument("baseline")
    parser.add_argument("treatment")
    parser.add_argument("--metric", default="accuracy", choices=["accuracy", "macro_f1"])
    parser.add_argument("--confidence", type=float, default=0.95)
    args = parser.parse_args()
    runs = pd.read_csv(args.runs)
    budgets = paired_budgets(runs, args.baseline, args.treatment, args.metric, args.confidence)
    print(markdown(budgets, args.baseline, args.treatment))


if __name__ == "__main__":
    main()
