"""Strategies, label budgets and seeds resolved from conf: what a comparison trains, under one id."""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf import LoadedConfig
from conf.errors import ExpectedError
from conf.schema import PipelineConfig
from tasks.data.table import ImageTable
from tasks.model.bases import check_architecture
from tasks.stages.base import Stage
from tasks.stages.from_scratch import FromScratch
from tasks.stages.plan import scratch_stages, transfer_stages
from tasks.stages.preflight import check_training_config


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


@task(name="check-label-budgets", cache_policy=NO_CACHE)
def check_label_budgets(table: ImageTable, budgets: tuple[int, ...], seed: int) -> None:
    """Draw every budget's training subset once, so a budget too large fails before training."""
    for budget in budgets:
        keep_labels_per_class(table, budget, seed)
