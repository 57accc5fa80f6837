"""Strategies that begin with the same stages train them once in a comparison."""

from __future__ import annotations

from pathlib import Path

from conf import load_config
from tasks.comparison import SharedStages, TrainedStage, resolve_strategies, stage_path
from tasks.config import LoadedConfig
from tasks.tracking import StageRecord

ROOT = Path(__file__).resolve().parents[1]


def strategy_configs(*overrides: str) -> dict:
    loaded = LoadedConfig(load_config(ROOT / "conf" / "compare.yaml", list(overrides)), ROOT)
    return {s.name: s.loaded.config for s in resolve_strategies(loaded)}


def stage(name: str) -> TrainedStage:
    return TrainedStage(name, None, None, None, StageRecord(name, f"run-{name}", None), [])  # type: ignore[arg-type]


def test_deeper_fine_tuning_begins_with_the_shallower_strategies_stages() -> None:
    configs = strategy_configs()
    fe, ft1, ft2, ft3 = (
        stage_path(configs[name])
        for name in ("feature_extraction", "fine_tune_1", "fine_tune_2", "fine_tune_3")
    )
    assert (len(fe), len(ft1), len(ft2), len(ft3)) == (1, 2, 3, 4)
    assert ft3[:3] == ft2 and ft2[:2] == ft1 and ft1[:1] == fe
    full = stage_path(configs["full_unfreeze"])
    assert full[:1] == fe and full[1] != ft1[1]  # same head, a different first stage


def test_a_stage_is_reused_only_when_everything_before_it_matches() -> None:
    configs = strategy_configs()
    shared = SharedStages()
    assert shared.reusable(configs["fine_tune_2"]) == []
    head, first = stage("feature_extraction"), stage("fine_tune_1")
    shared.keep(configs["fine_tune_1"], 0, head)
    shared.keep(configs["fine_tune_1"], 1, first)

    assert shared.reusable(configs["feature_extraction"]) == [head]
    assert shared.reusable(configs["fine_tune_2"]) == [head, first]
    assert shared.reusable(configs["full_unfreeze"]) == [head]
    assert shared.reusable(configs["from_scratch"]) == []


def test_a_different_seed_learning_rate_or_image_size_shares_nothing() -> None:
    shared = SharedStages()
    configs = strategy_configs()
    shared.keep(configs["fine_tune_1"], 0, stage("feature_extraction"))
    shared.keep(configs["fine_tune_1"], 1, stage("fine_tune_1"))
    for override in ("seed=7", "data.image_size=64", "feature_extraction.learning_rate=0.01"):
        assert shared.reusable(strategy_configs(override)["fine_tune_2"]) == [], override
    slower = strategy_configs("fine_tune.lr_factor=0.5")["fine_tune_2"]
    assert [s.name for s in shared.reusable(slower)] == ["feature_extraction"]
