"""From scratch: the whole network, BatchNorm included, trained from random weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.data import DataConfig
from conf.training import AugmentationConfig
from tasks.data.stream import image_dataset
from tasks.inference.evaluate import evaluate_on_images
from tasks.model.blocks import make_fully_trainable
from tasks.runtime.run_names import for_stage
from tasks.stages.base import StageInputs, augmentation_lineage
from tasks.stages.fitting import fit_from_scratch, image_splits
from tasks.tracking.history import StageResult, TrainingHistory


@dataclass(frozen=True)
class FromScratch:
    """The baseline that transfer has to beat: every layer trains from the first epoch.

    It trains at the head stage's rate (both start from random weights) with the head stage's
    early-stopping patience.
    """

    epochs: int
    learning_rate: float
    patience: int
    name: str = "from_scratch"
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)

    def lineage(self) -> dict[str, Any]:
        return {"kind": "from_scratch", **self.params(), "patience": self.patience}

    def params(self) -> dict[str, Any]:
        return {
            "unfreeze_blocks": "all",
            "epochs": self.epochs,
            "learning_rate": self.learning_rate,
            **augmentation_lineage(self.augmentation),
        }

    def describe(self) -> str:
        return "Every layer, BatchNorm included, trained from random weights: the baseline."

    def train(self, inputs: StageInputs) -> StageResult:
        config = inputs.loaded.config
        history = for_stage(train_from_scratch, self.name)(
            inputs.classifier,
            inputs.table,
            self,
            config.data,
            config.seed,
            config.compute.jit_compile,
            wait_for=inputs.after,
        )
        evaluation = for_stage(evaluate_on_images, self.name)(
            inputs.classifier.model, inputs.table, config.data
        )
        return StageResult(history, evaluation)


@task(name="train-from-scratch", cache_policy=NO_CACHE)
def train_from_scratch(
    classifier, table, stage: FromScratch, data: DataConfig, seed: int, jit_compile: bool
) -> TrainingHistory:
    """Train the whole network from its random weights.

    BatchNorm statistics come from up to 512 training images (see fit_from_scratch).
    """
    make_fully_trainable(classifier.base)
    train, validation = image_splits(table, data, seed, stage.augmentation)
    sample = image_dataset(
        table.split("train"), table.classes, data.image_size, 512, shuffle_seed=seed
    )
    return fit_from_scratch(
        classifier.model,
        train,
        validation,
        next(iter(sample))[0],
        epochs=stage.epochs,
        learning_rate=stage.learning_rate,
        patience=stage.patience,
        seed=seed,
        stage=stage.name,
        jit_compile=jit_compile,
    )
