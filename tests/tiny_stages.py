"""A tiny real dataset and classifier for training one stage quickly (32 px, 10 classes)."""

from __future__ import annotations

from pathlib import Path

import keras

from conf import PipelineConfig
from tasks.config import LoadedConfig
from tasks.model import build_base, build_classifier
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


def train_stage(loaded: LoadedConfig, table, architecture: str, head: bool = False):
    """The config's fine-tuning stages (after the head's, with `head`), in order, on a freshly
    built classifier: same seed, same starting weights every time. Returns the classifier and
    the last stage's result."""
    keras.utils.set_random_seed(loaded.config.seed)
    base = build_base(architecture, None, SIZE, {})
    classifier = build_classifier(base, architecture, len(table.classes), "avg", 0.2, 0, 3)
    inputs = StageInputs(classifier, table, loaded, data_version="v1")
    result = None
    for stage in transfer_stages(loaded.config)[0 if head else 1 :]:
        result = stage.train(inputs)
    return classifier, result
