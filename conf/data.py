"""The data sections: the images a run reads and how they are split and fed; the demo dataset."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from conf.section import Section


class DataConfig(Section):
    """Where the images are and how they are split and fed."""

    path: str = Field(
        "data/fashion_mnist",
        description="Folder of class sub-folders, or a CSV manifest (path,label[,split]), "
        "relative to the project root.",
    )
    dvc_file: str | None = Field(
        "data.dvc",
        description="The .dvc file that pins the data version; null to skip the DVC pull.",
    )
    image_size: int = Field(96, ge=32, le=1024, description="Square input size fed to the base.")
    batch_size: int = Field(
        64, ge=1, le=4096, description="Images per training step and per forward pass."
    )
    val_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of each class held out for validation, without a split column.",
    )
    test_fraction: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description="Share of each class held out for the test set, without a split column.",
    )
    on_bad_images: Literal["fail", "skip"] = Field(
        "fail",
        description="What to do with image files that cannot be decoded: 'fail' the run naming "
        "them all, or 'skip' them and list them in skipped_images.csv on the MLflow run.",
    )

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                "data.val_fraction + data.test_fraction must be below 1 so that images remain "
                f"for training (got {self.val_fraction} + {self.test_fraction})"
            )
        return self


class DemoDataConfig(Section):
    """How the Fashion-MNIST demo dataset is cut from the full dataset."""

    out: str = Field(
        "data/fashion_mnist", description="Folder written, relative to the project root."
    )
    train_per_class: int = Field(
        100, ge=1, le=6000, description="Training images per class in the demo dataset."
    )
    val_per_class: int = Field(
        50, ge=0, le=6000, description="Validation images per class in the demo dataset."
    )
    test_per_class: int = Field(1000, ge=1, le=1000, description="1000 keeps the full test set.")
    seed: int = Field(0, description="Draws which Fashion-MNIST images the demo dataset takes.")
