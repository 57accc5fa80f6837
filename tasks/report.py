"""What a run tells its user: a Prefect artifact summarising the stages, and a DVC metrics file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.config import LoadedConfig
from tasks.credentials import redact_url
from tasks.evaluate import Evaluation, confusion_matrix_figure
from tasks.registry import ModelVersionRef, PromotionDecision
from tasks.tracking import SKIPPED_IMAGES_ARTIFACT, RunRef, ui_hint
from tasks.train import TrainingHistory


@dataclass(frozen=True)
class StageSummary:
    """One stage's headline figures."""

    stage: str
    test_accuracy: float
    test_macro_f1: float
    trainable_params: int
    learning_rate: float
    epochs_run: int
    train_seconds: float

    @classmethod
    def of(cls, stage: str, history: TrainingHistory, evaluation: Evaluation) -> StageSummary:
        return cls(
            stage=stage,
            test_accuracy=evaluation.accuracy,
            test_macro_f1=evaluation.macro_f1,
            trainable_params=history.trainable_params,
            learning_rate=history.learning_rate,
            epochs_run=history.epochs_run,
            train_seconds=history.seconds,
        )


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


@task(name="publish-report", cache_policy=NO_CACHE)
def publish_report(
    run: RunRef,
    summaries: list[StageSummary],
    challenger: ModelVersionRef,
    decision: PromotionDecision,
    evaluation: Evaluation,
    loaded: LoadedConfig,
    skipped_images: int = 0,
) -> None:
    """A Prefect markdown artifact for the UI; reports/ metrics and confusion matrix for DVC."""
    ui = ui_hint(run.tracking_uri, loaded.project)
    create_markdown_artifact(
        markdown_summary(run, summaries, challenger, decision, ui, skipped_images),
        key="training-summary",
        description="Stages, test scores and the promotion decision of this run",
    )
    final = summaries[-1]
    metrics = {
        "test_accuracy": final.test_accuracy,
        "test_macro_f1": final.test_macro_f1,
        "stages": {s.stage: asdict(s) for s in summaries},
        "model_version": challenger.version,
        "promoted": decision.promote,
    }
    reports = loaded.path("reports")
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    figure = confusion_matrix_figure(evaluation, title=final.stage)
    figure.savefig(reports / "confusion_matrix.png", dpi=100)
