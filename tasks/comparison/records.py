"""What a comparison records: its MLflow runs, Prefect artifacts, and tables and charts in reports/."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from conf.compare import CompareConfig
from conf.data import DataConfig
from conf.servers import TrackingConfig
from tasks.comparison.charts import comparison_figure, data_efficiency_figure, markdown_comparison
from tasks.comparison.strategies import ComparisonPlan
from tasks.comparison.table import CellSummary
from tasks.comparison.winner import ComparisonSummary
from tasks.data.table import ImageTable
from tasks.registry.decision import PromotionDecision
from tasks.registry.versions import ModelVersionRef
from tasks.runtime.timeouts import retry_if_store_locked
from tasks.runtime.tracking_server import tracking_uri, ui_hint
from tasks.tracking.history import StageSummary
from tasks.tracking.runs import (
    RunRef,
    close_run_after_failure,
    ensure_experiment,
    finish_run,
    flatten,
    log_skipped_images,
    log_summary,
    source_tags,
    start_nested_run,
    start_pipeline_run,
)


@dataclass(frozen=True)
class ComparisonFiles:
    """What a comparison wrote under reports/."""

    table: Path
    runs: Path
    chart: Path
    data_efficiency: Path


# MLflow I/O can hit a busy tracking server or a locked SQLite file: retry 2, 4, 8 s later.
_BACKOFF = exponential_backoff(backoff_factor=2)


def _listed(values: tuple[int, ...]) -> str:
    return ", ".join(str(value) for value in values)


@task(
    name="start-comparison-run",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=_BACKOFF,
    retry_condition_fn=retry_if_store_locked,
)
def start_comparison_run(
    data: DataConfig,
    compare: CompareConfig,
    seed: int,
    tracking: TrackingConfig,
    project: Path,
    plan: ComparisonPlan,
    table: ImageTable,
    data_version: str,
) -> RunRef:
    """Open the comparison's own MLflow run in the tracking section's experiment, beside the
    strategies' runs, for the table and charts; its params are the seed and the data and compare
    sections.

    Image files left out as undecodable are listed on it, as on a training run.
    """
    uri = tracking_uri(project)
    experiment_id = ensure_experiment(uri, tracking.experiment, project)
    tree = {
        "seed": seed,
        "data": data.model_dump(mode="json"),
        "compare": compare.model_dump(mode="json"),
    }
    strategies = ", ".join(strategy.name for strategy in plan.strategies)
    description = (
        f"Comparison {plan.comparison_id}: {strategies} at {_listed(plan.label_budgets)} labels "
        f"per class, seeds {_listed(plan.seeds)}, scored by test {plan.metric}. Every strategy, "
        "budget and seed is a run of its own tagged with this comparison_id; the runs nested "
        "here hold each strategy and budget's mean and interval over the seeds."
    )
    run = start_pipeline_run(
        uri,
        experiment_id,
        run_name=f"comparison-{plan.comparison_id[:8]}",
        params=flatten(tree),
        tags={
            "comparison_id": plan.comparison_id,
            "comparison": "summary",
            "data_version": data_version,
            **source_tags(project),
        },
        dataset=table.frame,
        dataset_source=str((project / data.path).resolve()),
        data_version=data_version,
        heartbeat_seconds=tracking.heartbeat_seconds,
        description=description,
    )
    log_skipped_images(run, table.skipped, project)
    return run


@task(
    name="log-strategy-summary",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=_BACKOFF,
    retry_condition_fn=retry_if_store_locked,
)
def log_strategy_summary(
    run: RunRef, labels_per_class: int, stages: list[StageSummary], worker_peak_rss_mb: float
) -> None:
    """The columns the MLflow compare view lines strategies up by, as the parent run's metrics.

    `worker_peak_rss_mb` is the peak memory of the process that trained the cell so far, so a
    worker that grows from cell to cell shows it.
    """
    log_summary(
        run,
        {
            "labels_per_class": float(labels_per_class),
            "trainable_params": float(stages[-1].trainable_params),
            "training_seconds": sum(s.train_seconds for s in stages),
            "epochs": float(sum(s.epochs_run for s in stages)),
            "worker_peak_rss_mb": worker_peak_rss_mb,
        },
        {"stages": " > ".join(s.stage for s in stages)},
    )


@task(
    name="log-cell-summaries",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=_BACKOFF,
    retry_condition_fn=retry_if_store_locked,
)
def log_cell_summaries(comparison: RunRef, plan: ComparisonPlan, cells: list[CellSummary]) -> None:
    """One run per strategy and budget, nested in the comparison's, with its means and intervals.

    MLflow's UI cannot average repeated runs: these runs carry `test_accuracy_mean`,
    `test_accuracy_ci_low`, `test_accuracy_ci_high`, ... for its table and compare view.
    """
    comparison_run = MlflowClient(comparison.tracking_uri).get_run(comparison.run_id)
    for cell in cells:
        seeds = ",".join(str(outcome.seed) for outcome in cell.outcomes)
        run = start_nested_run(
            comparison,
            comparison_run,
            run_name=f"{cell.strategy}-{cell.labels_per_class}-per-class-summary",
            description=(
                f"{cell.strategy} at {cell.labels_per_class} labels per class: mean, standard "
                f"deviation and {plan.confidence:.0%} interval ({cell.intervals[plan.metric].method}) "
                f"of the test scores over seeds {seeds.replace(',', ', ')}; the seeds' runs are "
                "listed in the tag seed_run_ids."
            ),
            tags={
                "comparison_id": plan.comparison_id,
                "comparison": "cell-summary",
                "strategy": cell.strategy,
                "label_budget": str(cell.labels_per_class),
                "seeds": seeds,
                "seed_run_ids": ",".join(outcome.run.run_id for outcome in cell.outcomes),
                "interval": f"{plan.confidence:.0%} {cell.intervals[plan.metric].method}",
                "within_best": str(cell.within_best).lower(),
            },
        )
        try:
            log_summary(run, cell.metrics(), {})
        except BaseException as error:
            close_run_after_failure(run, error)
            raise
        finish_run(run)


@task(
    name="log-comparison",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=_BACKOFF,
    retry_condition_fn=retry_if_store_locked,
)
def log_comparison(
    run: RunRef,
    summary: ComparisonSummary,
    metric: str,
    challenger: ModelVersionRef,
    decision: PromotionDecision,
) -> None:
    """Both tables (CSV) and the charts on the comparison run, the winner as its tags; close it."""
    frame, runs, winner = summary.table, summary.runs, summary.winner
    client = MlflowClient(run.tracking_uri)
    client.log_text(run.run_id, frame.to_csv(index=False), "comparison.csv")
    client.log_text(run.run_id, runs.to_csv(index=False), "comparison_runs.csv")
    client.log_figure(run.run_id, comparison_figure(frame, metric), "comparison.png")
    client.log_figure(run.run_id, data_efficiency_figure(frame, metric), "data_efficiency.png")
    interval = winner.cell.intervals[metric]
    log_summary(
        run,
        {
            f"best_test_{metric}": winner.outcome.evaluation.metric(metric),
            **interval.columns(f"winner_test_{metric}"),
        },
        {
            "best_strategy": winner.strategy,
            "best_run_id": winner.outcome.run.run_id,
            "winner_reason": winner.reason,
            "registered_version": f"{challenger.name}/{challenger.version}",
            **decision.tags(),
        },
    )
    finish_run(run)


@task(name="publish-comparison", cache_policy=NO_CACHE)
def publish_comparison(
    summary: ComparisonSummary,
    metric: str,
    challenger: ModelVersionRef,
    decision: PromotionDecision,
    project: Path,
) -> ComparisonFiles:
    """Prefect table and summary artifacts for the UI; both CSVs and charts under the project's
    reports/."""
    frame, runs, winner = summary.table, summary.runs, summary.winner
    create_table_artifact(
        table=frame.round(4).to_dict(orient="records"),
        key="strategy-comparison",
        description="Mean, standard deviation and interval of the test scores over the seeds, "
        "per strategy and budget",
    )
    ui = ui_hint(winner.outcome.run.tracking_uri, project)
    create_markdown_artifact(
        markdown_comparison(frame, metric, winner, challenger, decision, ui),
        key="comparison-summary",
        description="The comparison table, the winning strategy and the promotion decision",
    )
    reports = project / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    files = ComparisonFiles(
        table=reports / "comparison.csv",
        runs=reports / "comparison_runs.csv",
        chart=reports / "comparison.png",
        data_efficiency=reports / "data_efficiency.png",
    )
    frame.to_csv(files.table, index=False)
    runs.to_csv(files.runs, index=False)
    comparison_figure(frame, metric).savefig(files.chart, dpi=100)
    data_efficiency_figure(frame, metric).savefig(files.data_efficiency, dpi=100)
    return files
