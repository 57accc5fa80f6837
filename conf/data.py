"""The data sections: the images a run reads and how they are split and fed; the demo dataset."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from conf.section import Section

Policy = Literal["fail", "warn", "drop", "off"]
# The data gate's checks, in the order reports list them; each is a policy field below.
CHECK_NAMES = (
    "exact_duplicate",
    "near_duplicate",
    "conflicting_label",
    "label_issue",
    "class_balance",
    "blank_image",
)


class DataChecksConfig(Section):
    """What the data gate before training checks, and what it does with what it finds.

    Each check's policy: 'fail' stops the run before anything is trained or registered (the
    duplicate checks stop on copies across splits, leaks, and record copies within a split);
    'drop' removes the flagged images from training and records them ('warn' where a check
    has nothing to drop); 'warn' records and goes on; 'off' skips the check.
    docs/data-checks.md explains the defaults.
    """

    exact_duplicate: Policy = Field(
        "fail",
        description="The same decoded pixels twice. 'fail' stops on a copy between the test split "
        "and another (a leak); copies elsewhere are recorded.",
    )
    near_duplicate: Policy = Field(
        "fail",
        description="Re-encoded or resized copies. 'fail' stops on a copy between the test split "
        "and another (a leak); copies elsewhere are recorded.",
    )
    conflicting_label: Policy = Field(
        "drop", description="Copies of one image under different labels."
    )
    label_issue: Policy = Field(
        "warn",
        description="Likely wrong labels: cleanlab on out-of-fold probabilities of a linear "
        "model on the cached frozen features.",
    )
    class_balance: Literal["fail", "warn", "off"] = Field(
        "warn",
        description="Classes too small to train or to test, and the imbalance ratio between "
        "the largest and smallest class in training (nothing to drop).",
    )
    blank_image: Policy = Field("drop", description="Constant or near-constant images.")
    domain_fit: Literal["warn", "off"] = Field(
        "warn",
        description="Score how well the frozen features fit the training labels (LogME), and "
        "a randomly initialised copy of the base the same way; warn when the pretrained base "
        "does not beat it by domain_fit_margin.",
    )
    near_duplicate_similarity: float = Field(
        0.9985,
        gt=0.9,
        le=1.0,
        description="Correlation of two blurred grey thumbnails at or above which they are "
        "near-copies (bench/data_checks.py shows where planted copies and the demo's pairs fall).",
    )
    blank_spread: float = Field(
        2.0,
        ge=0.0,
        description="Standard deviation of the grey values (0-255, on a 28 px thumbnail) below which an image is blank.",
    )
    label_issue_folds: int = Field(
        5, ge=2, le=20, description="Folds of the cross-validated linear model."
    )
    min_train_per_class: int = Field(
        2, ge=1, description="Fewer training images than this in a class is a class_balance flag."
    )
    max_imbalance: float = Field(
        20.0,
        ge=1.0,
        description="Largest over smallest class in training above this is a class_balance flag.",
    )

    @field_validator(*CHECK_NAMES, "domain_fit", mode="before")
    @classmethod
    def _unquoted_off(cls, value: object) -> object:
        # YAML reads an unquoted `off` (and `no`, `false`) as false: that is 'off'.
        return "off" if value is False else value

    domain_fit_margin: float = Field(
        0.05,
        ge=0.0,
        description="LogME per image by which the pretrained base must beat the random one.",
    )
    domain_fit_images: int = Field(
        1000, ge=10, description="Training images (a seeded sample) the domain fit is scored on."
    )
    cache_dir: str | None = Field(
        ".cache/data_checks",
        description="Where results are kept per data version and settings; null: never reused.",
    )


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
    checks: DataChecksConfig = Field(default_factory=DataChecksConfig)
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
