"""Data augmentation: training images change every epoch, nothing else does."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from conf import ConfigError, PipelineConfig, load_config
from tasks.stages.fitting import image_splits
from tasks.stages.plan import scratch_stages, transfer_stages
from tests.tiny_stages import setting, train_stage

ROOT = Path(__file__).resolve().parents[1]
AUGMENTED = {"flip": True, "rotation": 0.1, "zoom": 0.1, "translation": 0.1}


def first_batch(dataset) -> np.ndarray:
    images, _ = next(iter(dataset))
    return images.numpy()


def test_augmented_training_images_change_every_epoch_and_validation_images_never(
    tmp_path: Path, tiny_table
) -> None:
    plain = setting(tmp_path, "MobileNet").config
    augmented = setting(tmp_path, "MobileNet", augmentation=AUGMENTED).config
    train, validation = image_splits(tiny_table, plain.data, plain.seed)
    changed, changed_validation = image_splits(
        tiny_table, augmented.data, augmented.seed, augmented.fine_tune.augmentation
    )
    # The same shuffle, so the first batch holds the same images, changed.
    before, epoch_one, epoch_two = first_batch(train), first_batch(changed), first_batch(changed)
    assert before.shape == epoch_one.shape
    assert np.abs(before - epoch_one).mean() > 1.0
    assert np.abs(epoch_one - epoch_two).mean() > 1.0  # a new draw each pass
    assert epoch_one.min() >= 0.0 and epoch_one.max() <= 255.0 + 1e-3
    np.testing.assert_array_equal(first_batch(validation), first_batch(changed_validation))


@pytest.mark.training
def test_a_stage_that_augments_trains_through_the_whole_model_and_says_why(
    tmp_path: Path, tiny_table, caplog
) -> None:
    with caplog.at_level(logging.INFO, logger="prefect"):
        _, result = train_stage(
            setting(tmp_path, "MobileNet", augmentation={"flip": True}), tiny_table, "MobileNet"
        )
    assert "no activation cache: augmentation changes the images" in caplog.text
    assert len(result.history.epochs["loss"]) >= 1
    assert not (tmp_path / "cache" / "activations").exists()


def test_augmentation_enters_the_lineage_only_when_on() -> None:
    def lineages(config: PipelineConfig) -> list[dict]:
        stages = [*transfer_stages(config), *scratch_stages(config, 5)]
        return [stage.lineage() for stage in stages]

    plain = load_config(ROOT / "conf" / "default.yaml")
    augmented = load_config(ROOT / "conf" / "default.yaml", ["fine_tune.augmentation.flip=true"])
    assert not any("augmentation" in lineage for lineage in lineages(plain))
    with_flip = lineages(augmented)
    assert "augmentation" not in with_flip[0]  # the head trains on cached features: no images
    assert all(lineage["augmentation"]["flip"] for lineage in with_flip[1:])


def test_out_of_range_augmentation_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"fine_tune\.augmentation\.rotation"):
        load_config(ROOT / "conf" / "default.yaml", ["fine_tune.augmentation.rotation=0.9"])
