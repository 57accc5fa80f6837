"""Strategy comparison: strategies resolved from conf, label budgets and seeds, and its records.

The table, the intervals and the winner rule are in tasks/comparison/table.py.
"""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from conf.errors import ExpectedError
from conf.schema import PipelineConfig
from tasks.comparison.table import (
    CellSummary,
    ComparisonSummary,
    StrategyOutcome,
    comparison_figure,
    data_efficiency_figure,
    markdown_comparison,
    summarize_comparison_outcomes,
)
from tasks.data.table import ImageTable
from tasks.registry.decision import PromotionDecision
from tasks.registry.versions import ModelVersionRef
from tasks.runtime.timeouts import retry_if_store_locked
from tasks.runtime.tracking_server import tracking_uri, ui_hint
from tasks.stages.base import Stage
from tasks.stages.from_scratch import FromScratch
from tasks.stages.plan import scratch_stages, transfer_stages
from tasks.stages.preflight import LoadedConfig, check_training_config
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


class NoStrategiesError(ExpectedError, ValueError):
    """The config declares no `compare.strategies`."""


class LabelBudgetError(ExpectedError, ValueError):
    """A label budget asks for more training images per class than the data holds."""


@dataclass(frozen=True)
class Strategy:
    """One way to train: the config it trains with and the stages it runs, in order."""

    name: str
    loaded: LoadedConfig
    stages: tuple[Stage, ...]

    @property
    def from_scratch(self) -> bool:
        return isinstance(self.stages[0], FromScratch)

    def with_seed(self, seed: int) -> Strategy:
        """The same strategy trained with another seed (its stages take no seed of their own)."""
        config = self.loaded.config.model_copy(update={"seed": seed})
        return Strategy(self.name, LoadedConfig(config, self.loaded.project), self.stages)


@dataclass(frozen=True)
class ComparisonPlan:
    """What a comparison trains: every strategy at every label budget with every seed, under one id."""

    comparison_id: str
    strategies: tuple[Strategy, ...]
    label_budgets: tuple[int, ...]
    metric: str
    seeds: tuple[int, ...] = (42,)
    confidence: float = 0.95

    @property
    def strategy_names(self) -> tuple[str, ...]:
        return tuple(strategy.name for strategy in self.strategies)


@dataclass(frozen=True)
class ComparisonFiles:
    """What a comparison wrote under reports/."""

    table: Path
    runs: Path
    chart: Path
    data_efficiency: Path


# --- strategies and label budgets ----------------------------------------------------------------


def epoch_budget(config: PipelineConfig) -> int:
    """The most epochs a transfer strategy may train: the head's plus every fine-tuning stage's."""
    return config.feature_extraction.epochs + sum(s.epochs for s in config.fine_tune.stages)


def resolve_strategies(loaded: LoadedConfig) -> tuple[Strategy, ...]:
    """Each declared strategy with its own config; from scratch gets the longest epoch budget."""
    config = loaded.config
    declared = config.compare.strategies
    if not declared:
        raise NoStrategiesError(
            "this config declares no compare.strategies; run `transferflow compare -c "
            "conf/compare.yaml`, or add a compare: section (see conf/compare.yaml)"
        )
    configs = [config.for_strategy(strategy) for strategy in declared]
    transfer = [c for c, s in zip(configs, declared, strict=True) if not s.from_scratch]
    longest = max((epoch_budget(c) for c in transfer), default=epoch_budget(config))
    strategies = []
    for strategy, resolved in zip(declared, configs, strict=True):
        if strategy.from_scratch:
            stages = scratch_stages(resolved, strategy.epochs or longest)
        else:
            stages = transfer_stages(resolved)
        strategies.append(
            Strategy(strategy.name, LoadedConfig(resolved, loaded.project), tuple(stages))
        )
    return tuple(strategies)


def stages_on_same_base(strategies: Sequence[Strategy], strategy: Strategy) -> tuple[Stage, ...]:
    """The stages of the other transfer strategies whose frozen base is `strategy`'s: the same
    base settings, image size and precision, so the activations at their cuts are the same."""

    def base_of(config: PipelineConfig) -> tuple:
        return (config.base, config.data.image_size, config.compute.precision)

    if strategy.from_scratch:
        return ()
    mine = base_of(strategy.loaded.config)
    return tuple(
        stage
        for other in strategies
        if other.name != strategy.name
        and not other.from_scratch
        and base_of(other.loaded.config) == mine
        for stage in other.stages
    )


def check_strategy(strategy: Strategy) -> None:
    """Fail now, not hours in, on an unknown architecture, bad options, missing weights or a
    fine-tuning stage deeper than the base."""
    from tasks.model.bases import check_architecture

    check_architecture(strategy.loaded.config.base.architecture)
    try:
        check_training_config(strategy.loaded)
    except ExpectedError as error:
        raise type(error)(f"strategy {strategy.name!r}: {error}") from error


def keep_labels_per_class(table: ImageTable, per_class: int, seed: int) -> ImageTable:
    """The table with `per_class` training images of each class; validation and test stay whole.

    Each class's training images are put in one order drawn from `seed` and the first `per_class`
    are kept, so a smaller budget's images are a subset of a larger one's: a data-efficiency
    curve then adds labels rather than swapping them.
    """
    train = table.split("train")
    counts = train["label"].value_counts()
    short = {label: int(counts.get(label, 0)) for label in table.classes}
    short = {label: count for label, count in short.items() if count < per_class}
    if short:
        have = ", ".join(f"{label} {count}" for label, count in sorted(short.items()))
        raise LabelBudgetError(
            f"label budget {per_class} per class exceeds the training images of {have}; lower "
            "compare.label_budgets (or compare.full_label_budgets), or build a bigger demo cut: "
            f"transferflow demo-data -s demo.train_per_class={per_class}"
        )
    kept: list[str] = []
    for label, rows in train.groupby("label", sort=True):
        ordered = rows["path"].sort_values().to_numpy()
        rng = np.random.default_rng([seed, zlib.crc32(str(label).encode())])
        kept.extend(ordered[rng.permutation(len(ordered))[:per_class]])
    frame = table.frame
    keep = (frame["split"] != "train") | frame["path"].isin(set(kept))
    return ImageTable(frame=frame[keep].reset_index(drop=True), classes=table.classes)


def labelled_subset_name(data_path: str, per_class: int) -> str:
    """How a label budget's subset of the data is named in MLflow, e.g. manifest.csv[10-per-class]."""
    return f"{Path(data_path).name}[{per_class}-per-class]"


# --- which strategies begin the same way --------------------------------------------------------


def stage_path(strategy: Strategy) -> tuple[str, ...]:
    """What decides each of a strategy's stages, stage by stage, as the config gives it.

    Element k holds everything but the stages (data, base, head, seed) and the settings of
    stages 0..k, so two strategies share their first k stages exactly when their paths share
    their first k elements. The pipeline's lineage keys add the data version and weights hash,
    which all strategies of one comparison share.
    """
    config = strategy.loaded.config
    trunk = config.model_dump(
        mode="json", include={"seed", "data", "base", "head"}, exclude={"data": {"path"}}
    )
    path, parts = [], []
    for stage in strategy.stages:
        parts.append(stage.lineage())
        path.append(json.dumps([trunk, parts], sort_keys=True))
    return tuple(path)


def shared_prefix(path: tuple[str, ...], other: tuple[str, ...]) -> int:
    """How many stages two strategies' paths begin with in common."""
    count = 0
    for mine, theirs in zip(path, other, strict=False):
        if mine != theirs:
            break
        count += 1
    return count


# --- Prefect steps -------------------------------------------------------------------------------

# MLflow I/O can hit a busy tracking server or a locked SQLite file: retry 2, 4, 8 s later.
_BACKOFF = exponential_backoff(backoff_factor=2)


def _comparison_id() -> str:
    """The Prefect flow run's id, so MLflow runs lead back to the flow run; random outside one."""
    from prefect.runtime import flow_run

    return str(flow_run.id or uuid.uuid4())


@task(name="plan-comparison", cache_policy=NO_CACHE)
def plan_comparison(loaded: LoadedConfig) -> ComparisonPlan:
    """Resolve and check every strategy, before any data is pulled or any model trained."""
    strategies = resolve_strategies(loaded)
    for strategy in strategies:
        check_strategy(strategy)
    compare = loaded.config.compare
    return ComparisonPlan(
        comparison_id=_comparison_id(),
        strategies=strategies,
        label_budgets=tuple(compare.budgets()),
        metric=loaded.config.evaluation.primary_metric,
        seeds=tuple(compare.seeds_or(loaded.config.seed)),
        confidence=compare.confidence,
    )


def _listed(values: tuple[int, ...]) -> str:
    return ", ".join(str(value) for value in values)


@task(name="check-label-budgets", cache_policy=NO_CACHE)
def check_label_budgets(table: ImageTable, budgets: tuple[int, ...], seed: int) -> None:
    """Draw every budget's training subset once, so a budget too large fails before training."""
    for budget in budgets:
        keep_labels_per_class(table, budget, seed)


@task(
    name="start-comparison-run",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=_BACKOFF,
    retry_condition_fn=retry_if_store_locked,
)
def start_comparison_run(
    loaded: LoadedConfig, plan: ComparisonPlan, table: ImageTable, data_version: str
) -> RunRef:
    """Open the comparison's own MLflow run, beside the strategies' runs, for the table and charts.

    Image files left out as undecodable are listed on it, as on a training run.
    """
    config = loaded.config
    uri = tracking_uri(loaded.project)
    experiment_id = ensure_experiment(uri, config.tracking.experiment, loaded.project)
    tree = {
        "seed": config.seed,
        "data": config.data.model_dump(mode="json"),
        "compare": config.compare.model_dump(mode="json"),
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
            **source_tags(loaded.project),
        },
        dataset=table.frame,
        dataset_source=str(loaded.path(config.data.path)),
        data_version=data_version,
        heartbeat_seconds=config.tracking.heartbeat_seconds,
        description=description,
    )
    log_skipped_images(run, table.skipped, loaded.project)
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


@task(name="summarize-comparison", cache_policy=NO_CACHE)
def summarize_comparison(
    outcomes: list[StrategyOutcome], plan: ComparisonPlan
) -> ComparisonSummary:
    """Each strategy's mean and interval per budget over the seeds, and the winner they give."""
    return summarize_comparison_outcomes(outcomes, plan.metric, plan.confidence)


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
    loaded: LoadedConfig,
) -> ComparisonFiles:
    """Prefect table and summary artifacts for the UI; both CSVs and charts under reports/."""
    frame, runs, winner = summary.table, summary.runs, summary.winner
    create_table_artifact(
        table=frame.round(4).to_dict(orient="records"),
        key="strategy-comparison",
        description="Mean, standard deviation and interval of the test scores over the seeds, "
        "per strategy and budget",
    )
    ui = ui_hint(winner.outcome.run.tracking_uri, loaded.project)
    create_markdown_artifact(
        markdown_comparison(frame, metric, winner, challenger, decision, ui),
        key="comparison-summary",
        description="The comparison table, the winning strategy and the promotion decision",
    )
    reports = loaded.path("reports")
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
