"""What a run tells its user: a Prefect artifact summarising the stages, and DVC metrics and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.inference.evaluate import Evaluation, confusion_matrix_figure
from tasks.registry.decision import PromotionDecision
from tasks.registry.versions import ModelVersionRef
from tasks.runtime.credentials import redact_url
from tasks.runtime.tracking_server import ui_hint
from tasks.tracking.history import StageSummary, TrainingHistory
from tasks.tracking.runs import SKIPPED_IMAGES_ARTIFACT, RunRef


def markdown_summary(
    run: RunRef,
    summaries: list[StageSummary],
    challenger: ModelVersionRef,
    decision: PromotionDecision,
    ui: str,
    skipped_images: int = 0,
) -> str:
    """The run as a markdown table of stages plus the registry outcome and a link to MLflow.

    `skipped_images` counts the undecodable image files the run left out, if any.
    """
    lines = [
        f"# Training run `{run.run_id}`",
        "",
        "| stage | test accuracy | macro-F1 | trainable params | learning rate | epochs | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.stage} | {s.test_accuracy:.4f} | {s.test_macro_f1:.4f} | {s.trainable_params:,} "
            f"| {s.learning_rate:g} | {s.epochs_run} | {s.train_seconds:.1f} |"
        )
    outcome = "promoted to `champion`" if decision.promote else "not promoted"
    lines += [
        "",
        f"Registered `{challenger.name}` version {challenger.version} (alias `challenger`): "
        f"{outcome} — {decision.reason}.",
        "",
    ]
    if skipped_images:
        lines += [
            f"Skipped {skipped_images} undecodable image file(s), listed in "
            f"`{SKIPPED_IMAGES_ARTIFACT}` on the MLflow run.",
            "",
        ]
    lines.append(_mlflow_link(run, ui))
    return "\n".join(lines)


def _mlflow_link(run: RunRef, ui: str) -> str:
    if run.tracking_uri.startswith(("http://", "https://")):
        server = redact_url(run.tracking_uri).rstrip("/")
        return f"[Open the run in MLflow]({server}/{run.ui_path()})"
    # A local store has no server to link to until the user starts one on the default port.
    return f"MLflow run: http://127.0.0.1:5000/{run.ui_path()} once `{ui}` is running."


# DVC reads these (dvc.yaml `metrics:` and `plots:`); git tracks them, so that `dvc exp show` and
# `dvc plots diff` can compare runs (.gitignore keeps the rest of reports/ out).
METRICS_FILE = "metrics.json"
TRAINING_CURVE_FILE = "training_curve.csv"
CONFUSION_FILE = "confusion.csv"
CONFUSION_IMAGE = "confusion_matrix.png"
CURVE_COLUMNS = ("epoch", "stage", "loss", "val_loss", "accuracy", "val_accuracy")


def run_metrics(summaries: list[StageSummary], evaluation: Evaluation) -> dict[str, float | int]:
    """The final model's scores and the run's cost: numbers only, one column each in DVC."""
    final = summaries[-1]
    return {
        "test_accuracy": evaluation.accuracy,
        "test_macro_f1": evaluation.macro_f1,
        "test_loss": evaluation.loss,
        "trainable_params": final.trainable_params,
        "epochs": sum(s.epochs_run for s in summaries),
        "train_seconds": round(sum(s.train_seconds for s in summaries), 1),
    }


def training_curve_rows(
    stages: list[str], histories: list[TrainingHistory]
) -> list[dict[str, str | int | float]]:
    """One row per epoch of every stage, numbered on across stages (1, 2, ...) for one x axis."""
    rows: list[dict[str, str | int | float]] = []
    for stage, history in zip(stages, histories, strict=True):
        for index in range(history.epochs_run):
            row: dict[str, str | int | float] = {"epoch": len(rows) + 1, "stage": stage}
            for name in CURVE_COLUMNS[2:]:
                values = history.epochs.get(name, ())
                row[name] = round(float(values[index]), 6) if index < len(values) else ""
            rows.append(row)
    return rows


def confusion_rows(evaluation: Evaluation) -> list[tuple[str, str]]:
    """(actual, predicted) class names, one per test image: the pairs DVC's confusion template counts."""
    classes = evaluation.classes
    return [
        (classes[actual], classes[predicted])
        for (actual, predicted), count in np.ndenumerate(evaluation.confusion)
        for _ in range(int(count))
    ]


def write_dvc_reports(
    reports: Path,
    summaries: list[StageSummary],
    histories: list[TrainingHistory],
    evaluation: Evaluation,
) -> None:
    """metrics.json, the training curve, and the confusion matrix as data and as an image."""
    reports.mkdir(parents=True, exist_ok=True)
    metrics = run_metrics(summaries, evaluation)
    (reports / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    with (reports / TRAINING_CURVE_FILE).open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=CURVE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(training_curve_rows([s.stage for s in summaries], histories))
    with (reports / CONFUSION_FILE).open("w", newline="") as stream:
        pairs = csv.writer(stream, lineterminator="\n")
        pairs.writerow(("actual", "predicted"))
        pairs.writerows(confusion_rows(evaluation))
    figure = confusion_matrix_figure(evaluation, title=summaries[-1].stage)
    figure.savefig(reports / CONFUSION_IMAGE, dpi=100)


@task(name="publish-report", cache_policy=NO_CACHE)
def publish_report(
    run: RunRef,
    summaries: list[StageSummary],
    histories: list[TrainingHistory],
    challenger: ModelVersionRef,
    decision: PromotionDecision,
    evaluation: Evaluation,
    project: Path,
    skipped_images: int = 0,
) -> None:
    """A Prefect markdown artifact for the UI; metrics, training curve and confusion matrix for
    DVC, in the project's reports/."""
    ui = ui_hint(run.tracking_uri, project)
    create_markdown_artifact(
        markdown_summary(run, summaries, challenger, decision, ui, skipped_images),
        key="training-summary",
        description="Stages, test scores and the promotion decision of this run",
    )
    write_dvc_reports(project / "reports", summaries, histories, evaluation)
