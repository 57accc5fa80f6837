"""Strategy comparison: strategies resolved from conf, label budgets, the comparison table and charts."""

from __future__ import annotations

import json
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from conf.errors import ExpectedError
from conf.schema import PipelineConfig
from tasks.config import LoadedConfig, check_training_config
from tasks.data import ImageTable
from tasks.evaluate import Evaluation
from tasks.registry import ModelVersionRef, PromotionDecision
from tasks.report import StageSummary
from tasks.stages.base import Stage
from tasks.stages.from_scratch import FromScratch
from tasks.stages.plan import scratch_stages, transfer_stages
from tasks.timeouts import retry_if_store_locked
from tasks.tracking import (
    RunRef,
    StageRecord,
    ensure_experiment,
    finish_run,
    flatten,
    git_commit,
    log_skipped_images,
    log_summary,
    start_pipeline_run,
    tracking_uri,
    ui_hint,
)

SCRATCH_STAGE = "from_scratch"
COLUMNS = (
    "strategy",
    "labels_per_class",
    "test_accuracy",
    "test_macro_f1",
    "trainable_params",
    "training_seconds",
    "epochs",
    "stages",
    "run_id",
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


@dataclass(frozen=True)
class ComparisonPlan:
    """What a comparison trains: every strategy at every label budget, under one id."""

    comparison_id: str
    strategies: tuple[Strategy, ...]
    label_budgets: tuple[int, ...]
    metric: str


@dataclass(frozen=True)
class StrategyOutcome:
    """One strategy trained at one label budget: its MLflow run, stages and final test scores."""

    strategy: str
    labels_per_class: int
    run: RunRef
    loaded: LoadedConfig
    stages: tuple[StageSummary, ...]
    final: StageRecord
    evaluation: Evaluation

    def row(self) -> dict[str, object]:
        """This outcome as a row of the comparison table."""
        last = self.stages[-1]
        return {
            "strategy": self.strategy,
            "labels_per_class": self.labels_per_class,
            "test_accuracy": last.test_accuracy,
            "test_macro_f1": last.test_macro_f1,
            "trainable_params": last.trainable_params,
            "training_seconds": sum(s.train_seconds for s in self.stages),
            "epochs": sum(s.epochs_run for s in self.stages),
            "stages": " > ".join(s.stage for s in self.stages),
            "run_id": self.run.run_id,
        }


@dataclass(frozen=True)
class ComparisonFiles:
    """What a comparison wrote under reports/."""

    table: Path
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


def check_strategy(strategy: Strategy) -> None:
    """Fail now, not hours in, on an unknown architecture, bad options, missing weights or a
    fine-tuning stage deeper than the base."""
    from tasks.model import check_architecture

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


# --- the table and its charts --------------------------------------------------------------------


def comparison_frame(outcomes: list[StrategyOutcome]) -> pd.DataFrame:
    """One row per strategy and label budget, in the order they ran."""
    return pd.DataFrame([outcome.row() for outcome in outcomes], columns=list(COLUMNS))


def best_outcome(outcomes: list[StrategyOutcome], metric: str) -> StrategyOutcome:
    """The strategy to deploy: the best test `metric` with the most labels; ties go to the faster."""
    most = max(outcome.labels_per_class for outcome in outcomes)
    candidates = [o for o in outcomes if o.labels_per_class == most]
    return max(
        candidates,
        key=lambda o: (o.evaluation.metric(metric), -sum(s.train_seconds for s in o.stages)),
    )


def comparison_figure(frame: pd.DataFrame, metric: str):
    """Bars of the test metric and of the training time per strategy, one colour per budget."""
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
        score_axes.bar(offset, rows[f"test_{metric}"], width, label=label)
        time_axes.bar(offset, rows["training_seconds"], width, label=label)
    for axes in (score_axes, time_axes):
        axes.set_xticks(positions, strategies, rotation=30, ha="right")
        axes.grid(axis="y", alpha=0.3)
    score_axes.set_ylim(0.0, 1.0)
    score_axes.set_ylabel(f"test {metric}")
    score_axes.set_title(f"Test {metric} per strategy")
    score_axes.legend(title="labels", fontsize=8)
    time_axes.set_ylabel("training time (s)")
    time_axes.set_title("Training time per strategy")
    figure.tight_layout()
    return figure


def data_efficiency_figure(frame: pd.DataFrame, metric: str):
    """Test metric against labelled images per class (log scale), one line per strategy."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    figure = Figure(figsize=(7.5, 4.8))
    axes = figure.subplots()
    for strategy, rows in frame.groupby("strategy", sort=False):
        rows = rows.sort_values("labels_per_class")
        scratch = (rows["stages"] == SCRATCH_STAGE).all()
        axes.plot(
            rows["labels_per_class"],
            rows[f"test_{metric}"],
            marker="o",
            linestyle="--" if scratch else "-",
            label=str(strategy),
        )
    budgets = sorted(frame["labels_per_class"].unique())
    axes.set_xscale("log")
    axes.set_xticks(budgets)
    axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("labelled training images per class (log scale)")
    axes.set_ylabel(f"test {metric}")
    axes.set_title("Data efficiency: test score against labels")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def markdown_comparison(
    frame: pd.DataFrame,
    metric: str,
    best: StrategyOutcome,
    challenger: ModelVersionRef,
    decision: PromotionDecision,
    ui: str,
) -> str:
    """The comparison's outcome for the Prefect UI: the winner, the registry decision, where to look."""
    outcome = "promoted to `champion`" if decision.promote else "not promoted"
    score = best.evaluation.metric(metric)
    return "\n".join(
        [
            f"# Strategy comparison: `{best.strategy}` wins",
            "",
            f"Best test {metric} with {best.labels_per_class} labels per class: {score:.4f} "
            f"({len(frame)} runs: {frame['strategy'].nunique()} strategies at "
            f"{frame['labels_per_class'].nunique()} label budgets).",
            "",
            f"Registered `{challenger.name}` version {challenger.version} (alias `challenger`): "
            f"{outcome} — {decision.reason}.",
            "",
            "The table is the `strategy-comparison` artifact; charts and CSV are on the MLflow "
            f"run tagged `comparison=summary` and under reports/. MLflow UI: `{ui}`.",
        ]
    )


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
    return ComparisonPlan(
        comparison_id=_comparison_id(),
        strategies=strategies,
        label_budgets=tuple(loaded.config.compare.budgets()),
        metric=loaded.config.evaluation.primary_metric,
    )


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
    run = start_pipeline_run(
        uri,
        experiment_id,
        run_name=f"comparison-{plan.comparison_id[:8]}",
        params=flatten(tree),
        tags={
            "comparison_id": plan.comparison_id,
            "comparison": "summary",
            "data_version": data_version,
            "mlflow.source.git.commit": git_commit(loaded.project),
        },
        dataset=table.frame,
        dataset_source=str(loaded.path(config.data.path)),
        data_version=data_version,
        heartbeat_seconds=config.tracking.heartbeat_seconds,
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


@task(name="tabulate-comparison", cache_policy=NO_CACHE)
def tabulate_comparison(outcomes: list[StrategyOutcome]) -> pd.DataFrame:
    """The comparison table: one row per strategy and label budget."""
    return comparison_frame(outcomes)


@task(name="pick-best-strategy", cache_policy=NO_CACHE)
def pick_best_strategy(outcomes: list[StrategyOutcome], metric: str) -> StrategyOutcome:
    """The winner at the largest label budget, whose model goes to the registry."""
    return best_outcome(outcomes, metric)


@task(
    name="log-comparison",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=_BACKOFF,
    retry_condition_fn=retry_if_store_locked,
)
def log_comparison(
    run: RunRef,
    frame: pd.DataFrame,
    metric: str,
    best: StrategyOutcome,
    challenger: ModelVersionRef,
    decision: PromotionDecision,
) -> None:
    """The table (CSV) and charts on the comparison run, the winner as its tags; then close it."""
    client = MlflowClient(run.tracking_uri)
    client.log_text(run.run_id, frame.to_csv(index=False), "comparison.csv")
    client.log_figure(run.run_id, comparison_figure(frame, metric), "comparison.png")
    client.log_figure(run.run_id, data_efficiency_figure(frame, metric), "data_efficiency.png")
    log_summary(
        run,
        {f"best_test_{metric}": best.evaluation.metric(metric)},
        {
            "best_strategy": best.strategy,
            "best_run_id": best.run.run_id,
            "registered_version": f"{challenger.name}/{challenger.version}",
            **decision.tags(),
        },
    )
    finish_run(run)


@task(name="publish-comparison", cache_policy=NO_CACHE)
def publish_comparison(
    frame: pd.DataFrame,
    metric: str,
    best: StrategyOutcome,
    challenger: ModelVersionRef,
    decision: PromotionDecision,
    loaded: LoadedConfig,
) -> ComparisonFiles:
    """Prefect table and summary artifacts for the UI; the CSV and both charts under reports/."""
    shown = frame.round({"test_accuracy": 4, "test_macro_f1": 4, "training_seconds": 1})
    create_table_artifact(
        table=shown.to_dict(orient="records"),
        key="strategy-comparison",
        description="Test scores, trainable parameters and training time per strategy and budget",
    )
    ui = ui_hint(best.run.tracking_uri, loaded.project)
    create_markdown_artifact(
        markdown_comparison(frame, metric, best, challenger, decision, ui),
        key="comparison-summary",
        description="The winning strategy and the promotion decision",
    )
    reports = loaded.path("reports")
    reports.mkdir(parents=True, exist_ok=True)
    files = ComparisonFiles(
        table=reports / "comparison.csv",
        chart=reports / "comparison.png",
        data_efficiency=reports / "data_efficiency.png",
    )
    frame.to_csv(files.table, index=False)
    comparison_figure(frame, metric).savefig(files.chart, dpi=100)
    data_efficiency_figure(frame, metric).savefig(files.data_efficiency, dpi=100)
    return files
