"""The configuration tree's root: one field per section, each a model of the modules beside it."""

from __future__ import annotations

from pydantic import Field, ValidationError, model_validator

from conf.compare import STRATEGY_SECTIONS, CompareConfig, StrategyConfig
from conf.data import DataConfig, DemoDataConfig
from conf.registry import EvaluationConfig, RegistryConfig
from conf.section import Section
from conf.servers import ScheduleConfig, TimeoutsConfig, TrackingConfig
from conf.training import (
    BaseModelConfig,
    ComputeConfig,
    FeatureExtractionConfig,
    FineTuneConfig,
    HeadConfig,
)


class PipelineConfig(Section):
    """The whole tree, as loaded from conf/*.yaml."""

    seed: int = Field(
        42, description="Draws the split and, without compare.seeds, everything else."
    )
    data: DataConfig = Field(default_factory=DataConfig)
    base: BaseModelConfig = Field(default_factory=BaseModelConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    feature_extraction: FeatureExtractionConfig = Field(default_factory=FeatureExtractionConfig)
    fine_tune: FineTuneConfig = Field(default_factory=FineTuneConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    demo: DemoDataConfig = Field(default_factory=DemoDataConfig)
    # Left out of every dump: how long to wait for a server changes nothing a run produces.
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig, exclude=True)
    # Left out of every dump too: moving the cron or the deployment name must not change the
    # config fingerprint, which would make the next scheduled run retrain.
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, exclude=True)
    # Left out of every dump: training runs' params and the registry's config fingerprint
    # stay what they were, whatever strategies a file declares.
    compare: CompareConfig = Field(default_factory=CompareConfig, exclude=True)

    def for_strategy(self, strategy: StrategyConfig) -> PipelineConfig:
        """The config one comparison strategy trains with: its section keys replace the file's."""
        tree = self.model_dump()
        for section in STRATEGY_SECTIONS:
            tree[section] = {**tree[section], **getattr(strategy, section)}
        if strategy.from_scratch:
            tree["base"]["weights"] = None
            tree["fine_tune"]["stages"] = []
        return PipelineConfig.model_validate(tree)

    @model_validator(mode="after")
    def _strategies_are_valid_configs(self) -> PipelineConfig:
        for strategy in self.compare.strategies:
            try:
                self.for_strategy(strategy)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
                    for error in exc.errors()
                )
                raise ValueError(f"compare.strategies {strategy.name!r}: {problems}") from None
        return self
