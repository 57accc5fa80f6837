"""Which stages a config trains, in order."""

from __future__ import annotations

from conf.schema import PipelineConfig
from tasks.stages.base import Stage
from tasks.stages.feature_extraction import HeadOnFeatures
from tasks.stages.fine_tune import FineTuneBlocks
from tasks.stages.from_scratch import FromScratch


def transfer_stages(config: PipelineConfig) -> list[Stage]:
    """The head on the frozen base, then each configured unfreezing stage at its falling rate."""
    head = config.feature_extraction
    rates = config.fine_tune.learning_rates(head.learning_rate)
    fine_tuning = tuple(
        FineTuneBlocks(
            stage,
            rate,
            config.fine_tune.patience,
            f"fine_tune_{number}",
            config.fine_tune.augmentation,
        )
        for number, (stage, rate) in enumerate(zip(config.fine_tune.stages, rates, strict=True), 1)
    )
    return [HeadOnFeatures(head, ahead=fine_tuning), *fine_tuning]


def scratch_stages(config: PipelineConfig, epochs: int) -> list[Stage]:
    """One stage that trains everything from random weights, at the head stage's rate and patience."""
    head = config.feature_extraction
    return [
        FromScratch(
            epochs, head.learning_rate, head.patience, augmentation=config.fine_tune.augmentation
        )
    ]
