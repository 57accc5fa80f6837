"""The data gate before training: the checks of tasks/data run on the pulled images and on the
frozen features the first stage needs anyway, decided by `data.checks`, recorded and kept."""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from conf import LoadedConfig
from conf.registry import RegistryConfig
from tasks.data.check_record import (
    data_root,
    draw_picture,
    findings_key,
    load_findings,
    reads_features,
    shown_paths,
    store_findings,
    summary_of,
    verdict,
    write_report,
)
from tasks.data.checks import CHECKS, CheckOutcome, apply_policy, find_problems, reads_pixels
from tasks.data.domain_fit import logme
from tasks.data.pixels import summarize_pixels
from tasks.data.table import ImageTable
from tasks.inference.features import weights_fingerprint
from tasks.inference.random_features import random_init_features
from tasks.model.classifier import build_classifier_for
from tasks.runtime.run_log import run_logger
from tasks.stages.base import Stage, StageInputs
from tasks.stages.feature_extraction import HeadOnFeatures, feature_pass_arguments
from tasks.stages.frozen_features import extract_frozen_features

REPORT_FOLDER = Path("reports") / "data_checks"


@dataclass(frozen=True)
class DataGate:
    """What the gate decided, the table to train on, and where its report is."""

    outcome: CheckOutcome
    summary: dict
    report: Path
    line: str

    @property
    def failed(self) -> bool:
        return bool(self.outcome.failing)

    @property
    def record(self) -> dict[str, float]:
        """The run's metrics: `data_checks.<count>` and `domain_fit.pretrained`/`random_init`."""
        metrics = {f"data_checks.{name}": float(n) for name, n in self.outcome.counts.items()}
        fit = self.outcome.findings.domain_fit
        metrics.update(
            {
                f"domain_fit.{name}": fit[name]
                for name in ("pretrained", "random_init")
                if name in fit
            }
        )
        return metrics


def per_class_test_minimum(registry: RegistryConfig) -> int:
    """Test images a class needs for the paired gate's per-class check to show a recall drop
    twice `max_class_drop` (a 20-point drop at the default 0.10); 0 for the threshold gate,
    which has no per-class check.

    A paired change of recall on n images, most of them discordant the way the drop goes, has
    a one-sided bound about z * sqrt(drop / n) wide; it excludes -max_class_drop when that is
    below drop - max_class_drop = max_class_drop. docs/promotion-gate.md measured the same
    order: a 20-point drop caught 34% of the time at 30 test images per class.
    """
    if registry.gate == "threshold":  # no per-class check
        return 0
    z = NormalDist().inv_cdf(1 - registry.alpha)
    drop = registry.max_class_drop
    return math.ceil(z * z * 2 * drop / (drop * drop))


@task(name="check-data", cache_policy=NO_CACHE)
def check_data(stages: Sequence[Stage], inputs: StageInputs) -> DataGate:
    """Check the table before training, decide by policy, write reports/data_checks/.

    Findings are kept in `data.checks.cache_dir` per data version, table and settings: a second
    run on the same data reads them back instead of decoding every image again.
    """
    started = time.perf_counter()
    config = inputs.loaded.config
    settings = config.data.checks
    project = inputs.loaded.project
    table = inputs.table
    min_test = per_class_test_minimum(config.registry)
    feature_check = reads_features(settings)
    features_key = (
        json.dumps(
            [
                config.base.architecture,
                config.base.options,
                weights_fingerprint(inputs.classifier.base),
                config.data.image_size,
                config.head.pooling,
                inputs.classifier.precision,
            ],
            sort_keys=True,
        )
        if feature_check
        else None
    )
    root = data_root(inputs.loaded.path(config.data.path))
    key = findings_key(table, settings, min_test, config.seed, inputs.data_version, features_key)
    kept = inputs.loaded.path(settings.cache_dir) / key if settings.cache_dir else None
    stored = load_findings(kept) if kept is not None else None
    if stored is not None:
        findings, picture = stored
    else:
        paths = table.frame["path"].tolist()
        pixels = summarize_pixels(paths) if reads_pixels(settings) else None
        features = _features_in_table_order(stages, inputs) if feature_check else None
        names = shown_paths(table.frame["path"], root)
        findings = find_problems(table, pixels, features, settings, min_test, config.seed, names)
        if settings.domain_fit != "off":
            assert features is not None
            findings = replace(findings, domain_fit=score_domain_fit(features, inputs))
        picture = draw_picture(findings, table, Path(tempfile.mkdtemp()) / "flagged.png")
        if kept is not None:
            store_findings(kept, findings, picture)
    outcome = apply_policy(table, findings, settings)
    summary = summary_of(outcome, settings, inputs.data_version)
    summary["reused"] = stored is not None
    summary["seconds"] = round(time.perf_counter() - started, 3)
    report = project / REPORT_FOLDER
    write_report(report, outcome, summary, picture, root)
    line = verdict(outcome, report / "summary.json")
    (run_logger().warning if outcome.failing else run_logger().info)(line)
    fit = findings.domain_fit
    if fit and fit["pretrained"] - fit["random_init"] < settings.domain_fit_margin:
        run_logger().warning(base_does_not_transfer(fit, config.base.architecture))
    create_markdown_artifact(
        markdown_summary(outcome, summary, report, root),
        key="data-checks",
        description="What the data gate found before training, and what it did",
    )
    return DataGate(outcome, summary, report, line)


def score_domain_fit(features: np.ndarray, inputs: StageInputs) -> dict[str, float]:
    """LogME of the frozen features and of a random-init copy of the base's, on the same seeded
    sample of training images (data.checks.domain_fit_images): the frozen ones are the gate's
    own, the random ones one forward pass over the sample."""
    config = inputs.loaded.config
    table = inputs.table
    train = np.flatnonzero(table.frame["split"].to_numpy() == "train")
    size = min(len(train), config.data.checks.domain_fit_images)
    sample = np.sort(np.random.default_rng(config.seed).choice(train, size, replace=False))
    frame = table.frame.iloc[sample].reset_index(drop=True)
    labels = table.label_ids(frame)
    random = random_init_features(
        config.base,
        config.head.pooling,
        config.data.image_size,
        config.seed,
        frame,
        table.classes,
        config.data.batch_size,
    )
    classes = len(table.classes)
    return {
        "pretrained": logme(features[sample], labels, classes),
        "random_init": logme(random, labels, classes),
        "images": float(size),
    }


def base_does_not_transfer(fit: dict[str, float], architecture: str) -> str:
    return (
        f"The pretrained {architecture} fits these labels little better than a randomly "
        f"initialised one (LogME {fit['pretrained']:.3f} against {fit['random_init']:.3f} on "
        f"{fit['images']:.0f} training images, margin data.checks.domain_fit_margin): its "
        "features may not transfer to this data. Consider another base, fine-tuning more "
        "blocks, or training from scratch."
    )


def gate_classifier(loaded: LoadedConfig, table: ImageTable):
    """The classifier whose frozen base gives the label check and the domain fit their
    features, built as the training flow builds it (the same cache entries); None when both
    are off.

    A flow that trains builds its own; this one is for the flows that do not (check-data, and
    a comparison, whose cells build theirs in workers).
    """
    config = loaded.config
    if not reads_features(config.data.checks):
        return None
    return build_classifier_for.fn(
        config.base,
        config.head,
        config.compute,
        config.data.image_size,
        config.seed,
        loaded.project,
        len(table.classes),
    )


def pool_after(gate: DataGate, table: ImageTable) -> pd.DataFrame | None:
    """The training images whose features the gate's feature pass cached, when the gate dropped
    some: the stages pick their rows from that entry instead of computing a new one."""
    return table.split("train") if len(gate.outcome.dropped) else None


def _features_in_table_order(stages: Sequence[Stage], inputs: StageInputs) -> np.ndarray:
    """Every image's frozen features, in the table's row order, from the same feature pass (and
    cache entries) the first stage makes: the stage then finds them all cached."""
    head = next((stage for stage in stages if isinstance(stage, HeadOnFeatures)), None)
    arguments = head.feature_pass(inputs) if head else feature_pass_arguments(inputs, [])
    by_split = extract_frozen_features.fn(*arguments)
    splits = inputs.table.frame["split"].to_numpy()
    features: np.ndarray | None = None
    for split, cached in by_split.items():
        values = cached.load()[0]
        if features is None:
            features = np.zeros((len(splits), values.shape[1]), dtype=np.float32)
        features[splits == split] = values
    assert features is not None
    return features


def markdown_summary(outcome: CheckOutcome, summary: dict, report: Path, root: Path) -> str:
    """The Prefect artifact: the decision, each check's count and policy, the first findings."""
    lines = [
        f"# Data checks: {outcome.decision}",
        "",
        f"{summary['images']} images, data version `{summary['data_version']}`"
        f"{' (findings reused)' if summary.get('reused') else ''}; report in `{report}`.",
        "",
        "| check | policy | flagged | stops the run |",
        "|---|---|---|---|",
    ]
    for check in CHECKS:
        lines.append(
            f"| {check} | {summary['policies'][check]} | {outcome.counts.get(check, 0)} | "
            f"{outcome.failing.get(check, '')} |"
        )
    lines += [
        "",
        f"Copies across splits: {outcome.counts['leak']} pair(s), "
        f"{outcome.counts['test_leak']} of them with the test split. "
        f"Dropped from training: {len(outcome.dropped)}.",
    ]
    fit = summary["domain_fit"]
    if fit:
        lines.append(
            f"Domain fit (LogME on {fit['images']:.0f} training images): pretrained "
            f"{fit['pretrained']:.3f}, random init {fit['random_init']:.3f}."
        )
    for check, note in summary["notes"].items():
        lines.append(f"- {check}: {note}")
    first = outcome.findings.flagged.head(15)
    if len(first):
        lines += ["", "| path | split | check | detail |", "|---|---|---|---|"]
        shown = shown_paths(first["path"], root)
        lines += [
            f"| {path} | {row.split} | {row.check} | {row.detail} |"
            for path, row in zip(shown, first.itertuples(), strict=True)
        ]
    return "\n".join(lines)
