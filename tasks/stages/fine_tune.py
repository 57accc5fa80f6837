"""Fine-tuning: the top blocks of the base unfrozen, the whole classifier trained at a lower rate."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.data import DataConfig
from conf.training import AugmentationConfig, BaseModelConfig, FineTuneStage
from tasks.inference.activations import (
    activation_dataset,
    cached_activations,
    cut_for_stage,
    images_to_cache,
)
from tasks.inference.evaluate import evaluate_model, evaluate_on_images
from tasks.model.blocks import unfreeze_top_blocks
from tasks.runtime.run_log import run_logger
from tasks.runtime.run_names import for_stage
from tasks.stages.base import StageInputs, augmentation_lineage
from tasks.stages.fitting import fine_tune, image_splits
from tasks.tracking.history import StageResult, TrainingHistory

# Rows a test pass through the activation cache reads at a time.
EVALUATION_BATCH = 256


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
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)

    def lineage(self) -> dict[str, Any]:
        return {
            "kind": "fine_tune",
            **self.settings.model_dump(mode="json"),
            "resolved_learning_rate": self.learning_rate,
            "patience": self.patience,
            **augmentation_lineage(self.augmentation),
        }

    def params(self) -> dict[str, Any]:
        return {**self.settings.model_dump(mode="json"), **augmentation_lineage(self.augmentation)}

    def describe(self) -> str:
        blocks = self.settings.unfreeze_blocks
        unfrozen = "every block" if blocks == "all" else f"the top {blocks} blocks"
        return (
            f"Fine-tuning: {unfrozen} of the base unfrozen (BatchNorm stays frozen) and trained "
            "with the head."
        )

    def fit(self, model, train, validation, seed: int, jit_compile: bool) -> TrainingHistory:
        """`model` (the classifier, or its top above the cut) trained at this stage's rate."""
        return fine_tune(
            model,
            train,
            validation,
            epochs=self.settings.epochs,
            learning_rate=self.learning_rate,
            patience=self.patience,
            seed=seed,
            stage=self.name,
            jit_compile=jit_compile,
        )

    def train(self, inputs: StageInputs) -> StageResult:
        config = inputs.loaded.config
        through_cache = for_stage(fine_tune_stage_on_activations, self.name)(
            inputs.classifier,
            inputs.table,
            self,
            config.base,
            config.data,
            inputs.feature_cache_dir,
            config.fine_tune.activation_cache_mb,
            config.seed,
            config.compute.jit_compile,
            inputs.data_version,
            inputs.feature_pool,
            wait_for=inputs.after,
        )
        if through_cache is not None:
            return through_cache
        history = for_stage(fine_tune_stage, self.name)(
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


@task(name="fine-tune-stage-on-activations", cache_policy=NO_CACHE)
def fine_tune_stage_on_activations(
    classifier,
    table,
    stage: FineTuneBlocks,
    base: BaseModelConfig,
    data: DataConfig,
    cache_dir: Path | None,
    cache_mb: float,
    seed: int,
    jit_compile: bool,
    data_version: str,
    feature_pool: pd.DataFrame | None,
) -> StageResult | None:
    """The stage trained and evaluated through the activation cache at its cut, or None (and
    the reason logged) when the whole model must run: the cache off or over its budget of
    `cache_mb`, the images augmented, or no single tensor at the cut
    (`tasks.inference.activations.cut_for_stage`)."""
    images = images_to_cache(table, feature_pool)
    cut = cut_for_stage(classifier, stage, cache_mb, images)
    if isinstance(cut, str):
        run_logger().info(
            "%s: trains through the whole model (no activation cache: %s)", stage.name, cut
        )
        return None
    unfreeze_top_blocks(classifier.base, stage.settings.unfreeze_blocks)
    cached = cached_activations(cut, table, base, data, cache_dir, data_version, feature_pool)
    run_logger().info(
        "%s: trains through the activation cache at %s (%s, %d bytes an image, %.1f MB for %d "
        "images, %s)",
        stage.name,
        cut.cut,
        cut.shape(),
        cut.bytes_per_image(),
        cut.bytes_per_image() * images / 1e6,
        images,
        "reused" if all(entry.reused for entry in cached.values()) else "computed",
    )
    batch = data.batch_size
    train, _ = activation_dataset(cached["train"], batch, shuffle_seed=seed)
    validation = activation_dataset(cached["val"], batch)[0] if "val" in cached else None
    history = stage.fit(cut.top, train, validation, seed, jit_compile)
    # No gradients are kept in a test pass, so a larger batch costs little memory and saves the
    # per-batch work of reading rows from the cache file.
    test, count = activation_dataset(cached["test"], max(batch, EVALUATION_BATCH))
    evaluation = evaluate_model(cut.top, test, count, table.classes)
    return StageResult(history, evaluation)


@task(name="fine-tune-stage", cache_policy=NO_CACHE)
def fine_tune_stage(
    classifier, table, stage: FineTuneBlocks, data: DataConfig, seed: int, jit_compile: bool
) -> TrainingHistory:
    """Unfreeze the top blocks the stage names, then fine-tune the whole model at a lower rate."""
    unfreeze_top_blocks(classifier.base, stage.settings.unfreeze_blocks)
    train, validation = image_splits(table, data, seed, stage.augmentation)
    return stage.fit(classifier.model, train, validation, seed, jit_compile)
