"""A tiny real dataset and classifier for training one stage quickly (32 px, 10 classes)."""

from __future__ import annotations

from pathlib import Path

import keras

from conf import LoadedConfig, PipelineConfig
from tasks.model.bases import build_base
from tasks.model.classifier import build_classifier, build_classifier_for
from tasks.stages.base import StageInputs
from tasks.stages.plan import transfer_stages

SIZE = 32


def setting(tmp_path: Path, architecture: str, **fine_tune) -> LoadedConfig:
    config = PipelineConfig.model_validate(
        {
            "seed": 3,
            "data": {"image_size": SIZE, "batch_size": 8, "dvc_file": None},
            "base": {"architecture": architecture, "weights": None, "options": {}},
            "fine_tune": {
                "stages": [
                    {"unfreeze_blocks": 2, "epochs": 2, "learning_rate": 1e-3},
                    {"unfreeze_blocks": 3, "epochs": 1, "learning_rate": 1e-4},
                ],
                **fine_tune,
            },
            "feature_extraction": {"cache_dir": str(tmp_path / "cache")},
        }
    )
    return LoadedConfig(config, tmp_path)


def classifier_for(loaded: LoadedConfig, num_classes: int):
    """The build-classifier step, on the sections of `loaded` the flows pass it."""
    config = loaded.config
    return build_classifier_for.fn(
        config.base,
        config.head,
        config.compute,
        config.data.image_size,
        config.seed,
        loaded.project,
        num_classes,
    )


def fresh_classifier(table, architecture: str):
    """A classifier with random base weights (no download), built after seeding."""
    keras.utils.set_random_seed(3)
    base = build_base(architecture, None, SIZE, {})
    return build_classifier(base, architecture, len(table.classes), "avg", 0.2, 0, 3)


def train_stage(
    loaded: LoadedConfig, table, architecture: str, head: bool = False, start: list | None = None
):
    """The config's fine-tuning stages (after the head's, with `head`), in order, on a freshly
    built classifier, from the weights `start` when given. Returns the classifier and the last
    stage's result.

    Two runs that must end alike pass the same `start`: a random base's initial weights follow
    the seed only as long as no other thread draws random numbers in between, which Prefect's
    task threads of an earlier test sometimes did.
    """
    classifier = fresh_classifier(table, architecture)
    if start is not None:
        classifier.model.set_weights(start)
    keras.utils.set_random_seed(loaded.config.seed)
    inputs = StageInputs(classifier, table, loaded, data_version="v1")
    result = None
    for stage in transfer_stages(loaded.config)[0 if head else 1 :]:
        result = stage.train(inputs)
    return classifier, result
