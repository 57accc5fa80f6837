"""What every stage kind has in common: the inputs it reads and the shape of what it returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tasks.tracking.history import StageResult

if TYPE_CHECKING:
    import pandas as pd

    from conf import LoadedConfig
    from conf.training import AugmentationConfig
    from tasks.data.table import ImageTable
    from tasks.model.classifier import Classifier


@dataclass(frozen=True)
class StageInputs:
    """What a stage trains: one classifier, on one table of images, under one config.

    `feature_pool` is a superset of the table's training images whose frozen features are
    cached together (a comparison's, shared by its budgets and seeds); None: the table's own.
    `shared_stages` are other strategies' stages on the same frozen base (a comparison's): the
    feature pass fills the activation caches of their cuts too.
    """

    classifier: Classifier
    table: ImageTable
    loaded: LoadedConfig
    data_version: str
    feature_pool: pd.DataFrame | None = None
    shared_stages: tuple[Stage, ...] = ()
    # What the stage's first step waits for: the record of the stage before it. A stage changes
    # the classifier in place, which Prefect cannot see; this draws the stages in order in the
    # run graph.
    after: tuple[Any, ...] = ()

    @property
    def unlogged_models_dir(self) -> Path:
        """Where a stage's model is kept if the tracking server cannot take it."""
        return self.loaded.project / ".cache" / "unlogged-models"

    @property
    def feature_cache_dir(self) -> Path | None:
        """The folder frozen features and activations are cached in; None: not cached."""
        folder = self.loaded.config.feature_extraction.cache_dir
        return self.loaded.path(folder) if folder else None


class Stage(Protocol):
    """One unit of training. The classifier it trains is changed in place.

    `name` names the stage's MLflow run (e.g. fine_tune_2); `lineage()` is what decides the
    outcome besides the stages before it and the data, base, head and seed they share; `params()`
    is what its MLflow run shows; `describe()` says in a sentence what the stage trains.
    """

    @property
    def name(self) -> str: ...

    def describe(self) -> str: ...

    def lineage(self) -> dict[str, Any]: ...

    def params(self) -> dict[str, Any]: ...

    def train(self, inputs: StageInputs) -> StageResult: ...


def augmentation_lineage(augmentation: AugmentationConfig) -> dict[str, Any]:
    """The augmentation a stage trains with, for its lineage and params; nothing when off, so a
    stage without augmentation keeps the key it had before the option existed."""
    return {"augmentation": augmentation.model_dump()} if augmentation.enabled else {}
