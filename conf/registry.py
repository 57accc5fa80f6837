"""The sections that judge a trained model: the metric it is ranked by, the promotion gate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from conf.section import Section


class EvaluationConfig(Section):
    primary_metric: Literal["accuracy", "macro_f1"] = Field(
        "accuracy", description="The test score the promotion gate and comparisons rank by."
    )


class RegistryConfig(Section):
    """Registration and the promotion gate."""

    model_name: str = Field(
        "fashion-mnist-classifier", min_length=1, description="The MLflow registered model."
    )
    min_value: float = Field(
        0.0, ge=0.0, le=1.0, description="The primary metric a champion needs, under every gate."
    )
    gate: Literal["threshold", "non_inferiority", "superiority"] = Field(
        "non_inferiority",
        description="non_inferiority: promote when the data show the challenger at most margin "
        "worse than the champion (the lower bound of challenger - champion is at least -margin); "
        "superiority: only when they show it better by more than margin. Both judge the two "
        "models on the same test images (tasks/registry/gate.py). threshold: promote when the "
        "challenger's score beats the champion's by min_improvement.",
    )
    min_improvement: float = Field(
        0.0,
        ge=0.0,
        description="threshold only: how much the challenger's score must beat the champion's by.",
    )
    alpha: float = Field(
        0.05, gt=0.0, lt=0.5, description="The paired gate's error rate: confidence 1 - alpha."
    )
    margin: float = Field(
        0.01,
        ge=0.0,
        lt=1.0,
        description="The difference that matters. non_inferiority: how much worse than the "
        "champion the data may leave the challenger; superiority: how much better it must be "
        "shown (0: any). A small test set cannot resolve a small margin: the flow warns before "
        "training, with the test images the margin needs.",
    )
    max_class_drop: float = Field(
        0.10,
        ge=0.0,
        le=1.0,
        description="The paired gate rejects a challenger when the data show its recall of a "
        "class lower than the champion's by more than this, with confidence 1 - alpha. It fails "
        "open: a class too small to show a drop rejects nothing. Retrains that differ only in "
        "their seed moved the demo's 'shirt' recall by up to 0.074.",
    )

    @model_validator(mode="after")
    def _min_improvement_is_for_the_threshold_gate(self) -> RegistryConfig:
        # Ignoring it would silently serve challengers the user asked to be better.
        if self.min_improvement > 0 and self.gate != "threshold":
            raise ValueError(
                f"registry.min_improvement ({self.min_improvement:g}) applies to registry.gate: "
                f"threshold only, and registry.gate is {self.gate}. Set registry.gate: threshold "
                "to keep it, or remove min_improvement (non_inferiority tolerates at most "
                "registry.margin worse; superiority needs it confidently better by registry.margin)"
            )
        return self
