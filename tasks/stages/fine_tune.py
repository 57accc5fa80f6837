"""Fine-tuning: the top blocks of the base unfrozen, the whole classifier trained at a lower rate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import FineTuneStage
from tasks.run_names import for_stage
from tasks.stages.base import StageInputs, StageResult
from tasks.train import TrainingHistory, fine_tune, image_splits


@dataclass(frozen=True)
class FineTuneBlocks:
    """Unfreeze `settings.unfreeze_blocks` top blocks, then fit on images at `learning_rate`.

    The rate is resolved from the stage before (explicit, or that one's times lr_factor), and
    `patience` is the fine_tune section's early-stopping patience.
    """

    settings: FineTuneStage
    learning_rate: float
    patience: int
    name: str

    def lineage(self) -> dict[str, Any]:
        return {
            "kind": "fine_tune",
            **self.settings.model_dump(mode="json"),
            "resolved_learning_rate": self.learning_rate,
            "patience": self.patience,
        }

    def params(self) -> dict[str, Any]:
        return self.settings.model_dump(mode="json")

    def describe(self) -> str:
        blocks = self.settings.unfreeze_blocks
        unfrozen = "every block" if blocks == "all" else f"the top {blocks} blocks"
        return (
            f"Fine-tuning: {unfrozen} of the base unfrozen (BatchNorm stays frozen) and trained "
            "with the head."
        )

    def train(self, inputs: StageInputs) -> StageResult:
        from tasks.evaluate import evaluate_on_images

        history = for_stage(fine_tune_stage, self.name)(
            inputs.classifier, inputs.table, self, inputs.loaded.config
        )
        evaluation = for_stage(evaluate_on_images, self.name)(
            inputs.classifier.model, inputs.table, inputs.loaded.config
        )
        return StageResult(history, evaluation)


@task(name="fine-tune-stage", cache_policy=NO_CACHE)
def fine_tune_stage(classifier, table, stage: FineTuneBlocks, config) -> TrainingHistory:
    """Unfreeze the top blocks the stage names, then fine-tune the whole model at a lower rate."""
    from tasks.model import unfreeze_top_blocks

    unfreeze_top_blocks(classifier.base, stage.settings.unfreeze_blocks)
    train, validation = image_splits(table, config)
    return fine_tune(
        classifier.model,
        train,
        validation,
        epochs=stage.settings.epochs,
        learning_rate=stage.learning_rate,
        patience=stage.patience,
        seed=config.seed,
        stage=stage.name,
    )
