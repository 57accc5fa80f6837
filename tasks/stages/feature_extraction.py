"""Feature extraction: a new head trained on the frozen base's cached features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.training import FeatureExtractionConfig
from tasks.inference.evaluate import evaluate_on_features
from tasks.runtime.run_names import for_stage
from tasks.stages.base import Stage, StageInputs
from tasks.stages.fitting import train_head
from tasks.stages.frozen_features import cuts_ahead, extract_frozen_features
from tasks.tracking.history import StageResult, TrainingHistory


@dataclass(frozen=True)
class HeadOnFeatures:
    """Train only the head, on features the frozen base computes once per data version."""

    settings: FeatureExtractionConfig
    name: str = "feature_extraction"
    # The stages after it on the same base: the feature pass caches their activations too.
    ahead: tuple[Stage, ...] = ()

    def lineage(self) -> dict[str, Any]:
        # Where features are cached changes nothing they are.
        return {"kind": "head_on_features", **self.settings.model_dump(exclude={"cache_dir"})}

    def params(self) -> dict[str, Any]:
        return self.settings.model_dump(mode="json")

    def describe(self) -> str:
        return "A new classification head trained on the frozen base's cached features."

    def features(self, inputs: StageInputs) -> dict:
        """Every split's frozen features, with the activations at the cuts of the fine-tuning
        stages to come (this strategy's and `inputs.shared_stages`), from the cache or cached."""
        return for_stage(extract_frozen_features, self.name)(
            *self.feature_pass(inputs), wait_for=inputs.after
        )

    def feature_pass(self, inputs: StageInputs) -> tuple:
        """The arguments of this stage's call of `extract_frozen_features`: the data gate makes
        the same call first, so that the stage finds all of it cached."""
        cuts = cuts_ahead(
            inputs.classifier,
            inputs.loaded.config.fine_tune.activation_cache_mb,
            inputs.table,
            inputs.feature_pool,
            [*self.ahead, *inputs.shared_stages],
        )
        return feature_pass_arguments(inputs, cuts)

    def train(self, inputs: StageInputs) -> StageResult:
        config = inputs.loaded.config
        features = self.features(inputs)
        history = for_stage(train_new_head, self.name)(
            inputs.classifier,
            features,
            self.settings,
            config.data.batch_size,
            config.seed,
            config.compute.jit_compile,
            self.name,
        )
        evaluation = for_stage(evaluate_on_features, self.name)(
            inputs.classifier, features["test"], inputs.table.classes
        )
        return StageResult(history, evaluation)


def feature_pass_arguments(inputs: StageInputs, cuts: list) -> tuple:
    """`extract_frozen_features`'s arguments for `inputs`, caching the activations at `cuts`."""
    config = inputs.loaded.config
    return (
        inputs.classifier,
        inputs.table,
        config.base,
        config.head.pooling,
        config.data,
        inputs.feature_cache_dir,
        inputs.data_version,
        inputs.feature_pool,
        cuts,
    )


@task(name="train-head", cache_policy=NO_CACHE)
def train_new_head(
    classifier,
    features,
    settings: FeatureExtractionConfig,
    batch_size: int,
    seed: int,
    jit_compile: bool,
    stage: str,
) -> TrainingHistory:
    """The new head learns on the frozen base's cached features (`stage` names its epoch lines)."""
    validation = features["val"].load() if "val" in features else None
    return train_head(
        classifier.head,
        features["train"].load(),
        validation,
        epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        patience=settings.patience,
        batch_size=batch_size,
        seed=seed,
        stage=stage,
        jit_compile=jit_compile,
    )
