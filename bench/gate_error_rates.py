"""How the promotion gates treat equivalent retrains (A/A), true drops, and planted regressions.

Trains the config (feature extraction only by default, to keep it short) once per seed, keeps
every model's predictions on the test images, then judges:

- A/A: every ordered pair of those models as champion and challenger;
- the power curve: an A/A pair whose challenger is made worse by 0, 0.5, 1, 1.5 and 2 points
  of accuracy, by turning a random share of its correct answers into a wrong class (the
  disagreement between the two models stays realistic; no further training);
- class drops: one class's recall lowered by 20 or 40 points the same way;
- planted regressions: each model against itself with two classes' outputs swapped, and
  against a model trained for one epoch.

Each at the full test set and at a small one (`--small-per-class` images per class, drawn at
random for each trial), under each gate at the config's alpha, margin and max_class_drop:
threshold (challenger score > champion score), non_inferiority and superiority, and
non_inferiority as it was before the rule was turned the right way round (promote unless the
upper bound lies below -margin). The per-class check is reported both ways: fail-open (the
gate's: reject when the data show a class dropped by more than max_class_drop) and fail-closed
(reject unless the data show no class dropped by more than that).

    .venv/bin/python bench/gate_error_rates.py --seeds 8   # KERAS_HOME must hold the weights
    .venv/bin/python bench/gate_error_rates.py --predictions /tmp/gate.npz   # judge again only

Prints the tables; docs/promotion-gate.md keeps the measured ones.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.registry.gate import PairedPredictions, judge_paired, paired_evidence

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "conf" / "default.yaml"
SWAPPED = ("ankle_boot", "shirt")
DROPS = (0.0, 0.005, 0.01, 0.015, 0.02)
CLASS_DROPS = (0.2, 0.4)


def train(config: Path, seed: int, extra: list[str]) -> str:
    """One training run of the config; the model version it registered."""
    from flows.train import train_classifier

    overrides = [
        f"seed={seed}",
        "registry.model_name=gate-bench",
        "tracking.experiment=gate-bench",
        "registry.min_value=0",
        "registry.gate=threshold",  # the pairs are judged below; this saves each run a test pass
        "tracking.resume=false",
        *extra,
    ]
    return train_classifier(str(config), overrides).version


def collect(config: Path, seeds: int, fine_tune: bool, out: Path) -> None:
    """Train the seeds and the one-epoch model; keep labels, classes and predictions in `out`."""
    work = Path(tempfile.mkdtemp(prefix="gate-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    from tasks.data.table import load_images
    from tasks.registry.held_out import version_predictions
    from tasks.registry.versions import registered_version
    from tasks.stages.preflight import load_and_check

    started = time.monotonic()
    extra = [] if fine_tune else ["fine_tune.stages=[]"]
    versions = [train(config, seed, extra) for seed in range(1, seeds + 1)]
    undertrained = train(config, 99, ["fine_tune.stages=[]", "feature_extraction.epochs=1"])
    minutes = (time.monotonic() - started) / 60

    loaded = load_and_check(str(config))
    table = load_images.fn(
        loaded.config.data, loaded.project, loaded.config.seed, data_version=""
    )  # the table the training runs judged on
    uri = os.environ["MLFLOW_TRACKING_URI"]

    def predicted(version: str) -> np.ndarray:
        found = registered_version(uri, "gate-bench", version)
        assert found is not None
        scored = version_predictions(uri, found, table, loaded.config.data.batch_size)
        assert scored is not None
        return scored.predicted

    np.savez(
        out,
        labels=table.label_ids(table.split("test")),
        classes=np.array(table.classes),
        seeds=np.stack([predicted(version) for version in versions]),
        undertrained=predicted(undertrained),
        minutes=minutes,
    )


@dataclass(frozen=True)
class Verdicts:
    """One judged pair under every gate and per-class rule."""

    promoted: dict[str, bool]  # by gate
    open_dropped: bool  # the per-class check as the gate runs it: a drop shown
    closed_dropped: bool  # fail-closed: no drop ruled out
    difference: float  # challenger - champion on these test images
    lower_bound: float
    disagreement: float


GATES = ("threshold", "non_inferiority", "non_inferiority_before", "superiority")


def judge(labels, classes, champion, challenger, settings) -> Verdicts:
    """Every gate's decision on one pair, from one bootstrap of the evidence."""
    evidence = paired_evidence(
        PairedPredictions(labels, champion, challenger, classes),
        metric="accuracy",
        alpha=settings.alpha,
    )
    decide = {
        mode: judge_paired(evidence, mode, settings.margin, settings.max_class_drop)
        for mode in ("non_inferiority", "superiority")
    }
    open_dropped = bool(decide["non_inferiority"].dropped_classes)
    closed_dropped = any(check.change.low < -settings.max_class_drop for check in evidence.classes)
    # The rule before: promote unless the whole interval lies below -margin.
    before = evidence.difference.high >= -settings.margin and not open_dropped
    return Verdicts(
        promoted={
            "threshold": bool(np.mean(challenger == labels) > np.mean(champion == labels)),
            "non_inferiority": decide["non_inferiority"].promote,
            "non_inferiority_before": before,
            "superiority": decide["superiority"].promote,
        },
        open_dropped=open_dropped,
        closed_dropped=closed_dropped,
        difference=evidence.difference.estimate,
        lower_bound=evidence.difference.low,
        disagreement=evidence.mcnemar.discordant / len(labels),
    )


def worsened(rng, labels, predicted, drop: float, within: np.ndarray | None = None) -> np.ndarray:
    """`predicted` with round(drop * images) of its correct answers (among `within`, if given)
    turned into a random wrong class: its accuracy there falls by exactly `drop`."""
    scope = np.ones(len(labels), bool) if within is None else within
    right = np.flatnonzero((predicted == labels) & scope)
    count = min(round(drop * scope.sum()), len(right))
    chosen = rng.choice(right, size=count, replace=False)
    out = predicted.copy()
    classes = int(labels.max()) + 1
    out[chosen] = (labels[chosen] + rng.integers(1, classes, count)) % classes
    return out


def swapped(predicted: np.ndarray, first: int, second: int) -> np.ndarray:
    out = predicted.copy()
    out[predicted == first], out[predicted == second] = second, first
    return out


def subsets(rng, labels, per_class: int | None) -> Iterator[np.ndarray]:
    """Index sets of the test images: all of them, or `per_class` of each class drawn anew."""
    while True:
        if per_class is None:
            yield np.arange(len(labels))
        else:
            yield np.concatenate(
                [
                    rng.choice(np.flatnonzero(labels == label), per_class, replace=False)
                    for label in np.unique(labels)
                ]
            )


def rates(verdicts: list[Verdicts]) -> dict[str, float]:
    """The share promoted under each gate, and the share each per-class rule flagged."""
    count = len(verdicts)
    shares = {gate: sum(v.promoted[gate] for v in verdicts) / count for gate in GATES}
    shares["class_open"] = sum(v.open_dropped for v in verdicts) / count
    shares["class_closed"] = sum(v.closed_dropped for v in verdicts) / count
    return shares


def row(name: str, verdicts: list[Verdicts], promoted: bool, drop: float | None = None) -> str:
    """One case: the share each gate promoted (A/A) or rejected, and each per-class rule flagged.

    With `drop`, also how non_inferiority treated the trials in which the challenger ended at
    least `drop` below its champion on these test images (a seed retrain that was better than
    its champion can end less than `drop` below it after losing `drop`).
    """
    shares = rates(verdicts)
    gates = [shares[gate] if promoted else 1 - shares[gate] for gate in GATES]
    cells = [f"{share:.0%}" for share in (*gates, shares["class_open"], shares["class_closed"])]
    shown = [v for v in verdicts if drop and v.difference <= -drop + 1e-9]
    rejected = sum(not v.promoted["non_inferiority"] for v in shown)
    cells.append(f"{rejected}/{len(shown)}" if drop else "")
    return f"| {name} | {len(verdicts)} | " + " | ".join(cells) + " |"


def table_for(
    saved, per_class: int | None, trials: int, settings, seed: int
) -> tuple[list[str], list[Verdicts]]:
    """The A/A, power, class-drop and planted rows at one test size."""
    rng = np.random.default_rng(seed)
    labels_all, classes = saved["labels"], tuple(str(name) for name in saved["classes"])
    models, weak = saved["seeds"], saved["undertrained"]
    pairs = list(itertools.permutations(range(len(models)), 2))
    draws = subsets(rng, labels_all, per_class)

    def judged(champion, challenger, index) -> Verdicts:
        return judge(labels_all[index], classes, champion[index], challenger[index], settings)

    repeats = 1 if per_class is None else max(1, -(-trials * 2 // len(pairs)))
    aa = [judged(models[a], models[b], next(draws)) for a, b in pairs for _ in range(repeats)]
    lines = [row("A/A: seed retrains, every ordered pair (**promoted**)", aa, True)]

    def worsened_trials(drop: float, within: int | None = None) -> list[Verdicts]:
        """Each trial: an A/A pair whose challenger loses `drop` (of class `within` alone)."""
        verdicts = []
        for trial in range(trials):
            a, b = pairs[trial % len(pairs)]
            index = next(draws)
            labels = labels_all[index]
            scope = None if within is None else labels == within
            challenger = models[b].copy()
            challenger[index] = worsened(rng, labels, models[b][index], drop, scope)
            verdicts.append(judged(models[a], challenger, index))
        return verdicts

    for drop in DROPS:
        verdicts = worsened_trials(drop)
        lines.append(row(f"challenger {drop * 100:g} points worse", verdicts, False, drop))
    shirt = classes.index("shirt")
    for drop in CLASS_DROPS:
        verdicts = worsened_trials(drop, shirt)
        lines.append(row(f"shirt's recall {drop * 100:g} points lower", verdicts, False))
    first, second = (classes.index(name) for name in SWAPPED)
    swaps = [
        judged(model, swapped(model, first, second), next(draws))
        for model in models
        for _ in range(repeats)
    ]
    lines.append(row(f"{' and '.join(SWAPPED)} swapped", swaps, False))
    weaker = [judged(model, weak, next(draws)) for model in models for _ in range(repeats)]
    lines.append(row("a one-epoch model", weaker, False))
    return lines, aa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--seeds", type=int, default=8, help="equivalent retrains (at least 5)")
    parser.add_argument("--fine-tune", action="store_true", help="keep the fine-tuning stages")
    parser.add_argument(
        "--predictions",
        type=Path,
        help="an .npz of predictions: read if it exists, else trained and written there",
    )
    parser.add_argument(
        "--trials", type=int, help="trials per power-curve point (default: 2 per ordered pair)"
    )
    parser.add_argument("--small-per-class", type=int, default=30)
    parser.add_argument("--margin", type=float, help="instead of the config's registry.margin")
    parser.add_argument("--alpha", type=float, help="instead of the config's registry.alpha")
    args = parser.parse_args()

    from tasks.stages.preflight import load_and_check

    registry = load_and_check(str(args.config)).config.registry
    for setting in ("margin", "alpha"):
        if getattr(args, setting) is not None:
            registry = registry.model_copy(update={setting: getattr(args, setting)})
    out = args.predictions or Path(tempfile.mkdtemp(prefix="gate-bench-")) / "predictions.npz"
    if not out.exists():
        collect(args.config, args.seeds, args.fine_tune, out)
    saved = np.load(out)
    labels, models = saved["labels"], saved["seeds"]
    accuracies = [float(np.mean(model == labels)) for model in models]
    print(
        f"{len(models)} seeds ({args.config.name}, trained in {float(saved['minutes']):.1f} min; "
        f"predictions in {out}); {len(labels)} test images"
    )
    print(
        f"accuracy over seeds {min(accuracies):.4f}-{max(accuracies):.4f} (mean "
        f"{np.mean(accuracies):.4f}); one-epoch model {np.mean(saved['undertrained'] == labels):.4f}"
    )
    print(
        f"gate settings: alpha {registry.alpha}, margin {registry.margin}, "
        f"max_class_drop {registry.max_class_drop}"
    )
    header = (
        "| case (share **rejected** unless marked) | trials | threshold | non_inferiority | "
        "non_inferiority, rule before | superiority | per-class fail-open flags | "
        "per-class fail-closed flags | non_inferiority, trials that end that much below the "
        "champion: rejected |\n|---|---|---|---|---|---|---|---|---|"
    )
    per_class = len(labels) // len(saved["classes"])
    trials = args.trials or 2 * len(models) * (len(models) - 1)
    for size, seed in ((None, 0), (args.small_per_class, 1)):
        started = time.monotonic()
        lines, aa = table_for(saved, size, trials, registry, seed)
        images = len(labels) if size is None else size * len(saved["classes"])
        print(f"\n### {images} test images ({size or per_class} per class)\n")
        print(header)
        print("\n".join(lines))
        bounds = [verdict.lower_bound for verdict in aa]
        share = [verdict.disagreement for verdict in aa]
        print(
            f"\nA/A: lower bounds {min(bounds):+.4f} to {max(bounds):+.4f}; the two models "
            f"disagree on {min(share):.1%} to {max(share):.1%} of the images (mean "
            f"{np.mean(share):.1%}); judged in {time.monotonic() - started:.0f} s"
        )


if __name__ == "__main__":
    main()
