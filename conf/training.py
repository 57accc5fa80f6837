"""The sections that decide what a run trains: the base, the head, each stage, how it computes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from conf.section import Section


class BaseModelConfig(Section):
    """The Keras Applications base."""

    architecture: str = Field("MobileNet", description="A keras.applications name, e.g. ResNet50.")
    weights: str | None = Field(
        "imagenet",
        description="'imagenet' (Keras cache, or download when online), a path to a weights "
        "file, or null for random initialisation.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra constructor arguments of the architecture, e.g. {alpha: 0.25}.",
    )

    @field_validator("weights", mode="before")
    @classmethod
    def _none_string_means_null(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.lower() in {"none", "null", ""} else value


class HeadConfig(Section):
    """The new classification head trained on top of the base."""

    pooling: Literal["avg", "max"] = Field(
        "avg", description="Global pooling of the base's last feature map."
    )
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="Dropout before the softmax layer.")
    hidden_units: int = Field(0, ge=0, description="0 for a single softmax layer.")


class FeatureExtractionConfig(Section):
    """Training the head on the frozen base."""

    epochs: int = Field(
        30, ge=1, description="Most epochs of the head; early stopping may end sooner."
    )
    learning_rate: float = Field(
        1e-3, gt=0.0, description="Adam's rate for the head; fine-tuning stages start from it."
    )
    patience: int = Field(4, ge=1, description="Early-stopping patience on validation loss.")
    cache_dir: str | None = Field(
        ".cache/features",
        description="Where frozen-base features are cached, relative to the project root; "
        "null computes them afresh every run.",
    )


class FineTuneStage(Section):
    """One unfreezing step: more of the top of the base becomes trainable."""

    unfreeze_blocks: int | Literal["all"] = Field(
        description="How many blocks, counted from the top of the base, are trainable."
    )
    epochs: int = Field(5, ge=1, description="Most epochs of this stage.")
    learning_rate: float | None = Field(
        None, gt=0.0, description="Defaults to the previous stage's rate times lr_factor."
    )

    @field_validator("unfreeze_blocks")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("unfreeze_blocks must be at least 1, or 'all'")
        return value


class AugmentationConfig(Section):
    """Random changes to each training image before the base, a new draw every epoch."""

    flip: bool = Field(False, description="Mirror images left to right at random.")
    rotation: float = Field(
        0.0, ge=0.0, le=0.5, description="Largest rotation, as a fraction of a full turn."
    )
    zoom: float = Field(0.0, ge=0.0, lt=1.0, description="Largest zoom in or out, as a fraction.")
    translation: float = Field(
        0.0, ge=0.0, lt=1.0, description="Largest shift, as a fraction of the image's side."
    )

    @property
    def enabled(self) -> bool:
        return self.flip or self.rotation > 0 or self.zoom > 0 or self.translation > 0


class FineTuneConfig(Section):
    """Staged unfreezing after feature extraction; an empty list means none."""

    lr_factor: float = Field(
        0.1, gt=0.0, le=1.0, description="Each stage's rate is the previous one times this."
    )
    patience: int = Field(2, ge=1, description="Early-stopping patience of every stage.")
    stages: list[FineTuneStage] = Field(default_factory=list)
    augmentation: AugmentationConfig = Field(
        default_factory=AugmentationConfig,
        description="Applied in fine-tuning stages and in training from scratch, never to the "
        "head's cached features; a stage that augments trains through the whole model.",
    )
    activation_cache_mb: float = Field(
        2048,
        ge=0,
        description="A stage trains through the frozen trunk's output, cached once per image at "
        "the cut, when that output for every image fits in this many MB; above it, or at 0, "
        "it trains through the whole model.",
    )

    @model_validator(mode="after")
    def _each_stage_unfreezes_more(self) -> FineTuneConfig:
        previous: int | str = 0
        for index, stage in enumerate(self.stages):
            if previous == "all":
                raise ValueError(f"fine_tune.stages[{index}] follows a stage that unfroze 'all'")
            if isinstance(stage.unfreeze_blocks, int) and stage.unfreeze_blocks <= int(previous):
                raise ValueError(
                    f"fine_tune.stages[{index}].unfreeze_blocks must be larger than the previous "
                    f"stage's ({stage.unfreeze_blocks} <= {previous})"
                )
            previous = stage.unfreeze_blocks
        return self

    def learning_rates(self, head_rate: float) -> list[float]:
        """Each stage's rate: explicit, or the previous one times lr_factor."""
        rates, rate = [], head_rate
        for stage in self.stages:
            rate = stage.learning_rate if stage.learning_rate is not None else rate * self.lr_factor
            rates.append(rate)
        return rates


class ComputeConfig(Section):
    """How TensorFlow computes: the layers' numeric precision and XLA compilation of training."""

    precision: Literal["float32", "mixed_float16"] = Field(
        "float32",
        description="mixed_float16: layers compute in float16 on float32 weights, the softmax "
        "stays in float32 and the loss is scaled so that small gradients survive; faster on "
        "NVIDIA GPUs with Tensor Cores (compute capability 7.0 or newer), slower on a CPU. "
        "Cached features and activations and resumable stages are kept apart per precision.",
    )
    jit_compile: bool = Field(
        False,
        description="Compile each training step with XLA (Keras' model.compile(jit_compile=...)). "
        "Off by default everywhere, where Keras alone would turn it on for a GPU. The first epoch "
        "of each stage pays the compilation, and XLA draws other dropout masks, so stages "
        "trained with it are not resumed by a run without it, nor the other way round.",
    )

    def non_default(self) -> dict[str, Any]:
        """The settings that differ from the defaults, as `compute.<key>`: for the keys that tell
        whether a stage or a retrain would give the same result, which at the defaults stay
        what they were before this section existed."""
        defaults = ComputeConfig()
        return {
            f"compute.{name}": value
            for name, value in self.model_dump(mode="json").items()
            if value != getattr(defaults, name)
        }
