"""How often each promotion gate promotes an equivalent retrain (A/A) and a planted regression.

Trains the demo config (feature extraction only, to keep it short) once per seed, then judges
every ordered pair of those models as champion and challenger, on the demo's test images,
under each gate:
- threshold: the old rule, challenger score > champion score (min_improvement 0);
- non_inferiority and superiority: the paired gate of tasks/gate.py at its defaults.

Planted regressions: each model against itself with two classes' outputs swapped (a
regression confined to two classes), and against a model trained for one epoch only.

    .venv/bin/python bench/gate_error_rates.py --seeds 6   # KERAS_HOME must hold the weights

Prints a table; docs/promotion-gate.md keeps the measured one.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "conf" / "default.yaml"


def train(seed: int, extra: list[str]) -> str:
    """One training run of the demo config; the model version it registered."""
    from flows.train import train_classifier

    overrides = [
        f"seed={seed}",
        "fine_tune.stages=[]",
        "registry.model_name=gate-bench",
        "tracking.experiment=gate-bench",
        "registry.min_value=0",
        "registry.gate=threshold",  # the pairs are judged below; this saves each run a test pass
        "tracking.resume=false",
        *extra,
    ]
    return train_classifier(str(CONFIG), overrides).version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6, help="equivalent retrains (at least 5)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gate-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"

    from conf.schema import RegistryConfig
    from tasks.config import load_and_check
    from tasks.data import load_images
    from tasks.gate import PairedPredictions, decide_paired
    from tasks.promotion import version_predictions
    from tasks.registry import registered_version

    started = time.monotonic()
    seeds = list(range(1, args.seeds + 1))
    versions = [train(seed, []) for seed in seeds]
    undertrained = train(99, ["feature_extraction.epochs=1"])
    trained_minutes = (time.monotonic() - started) / 60

    loaded = load_and_check(str(CONFIG))
    config = loaded.config
    table = load_images.fn(loaded, data_version="")  # the table the training runs judged on
    uri = os.environ["MLFLOW_TRACKING_URI"]

    def predicted(version: str) -> tuple[np.ndarray, np.ndarray]:
        found = registered_version(uri, "gate-bench", version)
        assert found is not None
        scored = version_predictions(uri, found, table, config)
        assert scored is not None
        return scored.labels, scored.predicted

    predictions = {version: predicted(version) for version in [*versions, undertrained]}
    labels = next(iter(predictions.values()))[0]
    registry = RegistryConfig()

    def judge(champion: np.ndarray, challenger: np.ndarray) -> dict[str, tuple[bool, list[str]]]:
        verdicts = {"threshold": (np.mean(challenger == labels) > np.mean(champion == labels), [])}
        for mode in ("non_inferiority", "superiority"):
            report = decide_paired(
                PairedPredictions(labels, champion, challenger, table.classes),
                metric="accuracy",
                mode=mode,  # type: ignore[arg-type]
                alpha=registry.alpha,
                margin=registry.margin,
                max_class_drop=registry.max_class_drop,
            )
            verdicts[mode] = (report.promote, report.dropped_classes)
        return verdicts

    modes = ("threshold", "non_inferiority", "superiority")
    equivalent = [
        judge(predictions[a][1], predictions[b][1]) for a, b in itertools.permutations(versions, 2)
    ]

    def swapped(predicted: np.ndarray) -> np.ndarray:
        first, second = 0, 6  # the classes in positions 0 and 6: ankle_boot and shirt
        out = predicted.copy()
        out[predicted == first], out[predicted == second] = second, first
        return out

    planted = [judge(predictions[v][1], swapped(predictions[v][1])) for v in versions]
    weaker = [judge(predictions[v][1], predictions[undertrained][1]) for v in versions]
    accuracies = [float(np.mean(predictions[v][1] == labels)) for v in versions]
    weak_accuracy = float(np.mean(predictions[undertrained][1] == labels))

    print(f"{len(versions)} seeds trained in {trained_minutes:.1f} min; {len(labels)} test images")
    print(
        f"accuracy over seeds: {min(accuracies):.4f}-{max(accuracies):.4f} "
        f"(mean {np.mean(accuracies):.4f}); one-epoch model {weak_accuracy:.4f}"
    )
    print(f"{'gate':<16} {'A/A promoted':>14} {'swap rejected':>14} {'1-epoch rejected':>17}")
    for mode in modes:
        promoted = sum(verdict[mode][0] for verdict in equivalent)
        rejected_swap = sum(not verdict[mode][0] for verdict in planted)
        rejected_weak = sum(not verdict[mode][0] for verdict in weaker)
        print(
            f"{mode:<16} {promoted:>7}/{len(equivalent):<6} {rejected_swap:>7}/{len(planted):<6}"
            f" {rejected_weak:>9}/{len(weaker):<7}"
        )
    named = {tuple(verdict["non_inferiority"][1]) for verdict in planted}
    print(f"classes named by the per-class check on the swap: {sorted(named)}")


if __name__ == "__main__":
    main()
