"""The `compare` section: the strategies a comparison trains and at which label budgets and seeds."""

from __future__ import annotations

from typing import Any

from pydantic import Field, PositiveInt, field_validator, model_validator

from conf.section import Section

# The sections a comparison strategy may change; data, split and seed stay the same for all.
STRATEGY_SECTIONS = ("base", "head", "feature_extraction", "fine_tune")


class StrategyConfig(Section):
    """One strategy of a comparison: its name and how it differs from the rest of the file.

    Each key given replaces that key of the section (a whole `options` mapping, a whole `stages`
    list), so `base: {architecture: ResNet50, options: {}}` leaves no MobileNet alpha behind.
    """

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9_-]*$",
        description="Tagged strategy=<name> on its MLflow runs: lower-case letters, digits, _ and -.",
    )
    from_scratch: bool = Field(
        False,
        description="Random weights and the whole network, BatchNorm included, trainable from the "
        "first epoch; no head-only stage and no unfreezing.",
    )
    epochs: int | None = Field(
        None,
        ge=1,
        description="from_scratch only. Default: the largest epoch budget among the transfer "
        "strategies (head epochs plus all their fine-tuning epochs).",
    )
    base: dict[str, Any] = Field(default_factory=dict, description="Keys of `base` to replace.")
    head: dict[str, Any] = Field(default_factory=dict, description="Keys of `head` to replace.")
    feature_extraction: dict[str, Any] = Field(
        default_factory=dict, description="Keys of `feature_extraction` to replace."
    )
    fine_tune: dict[str, Any] = Field(
        default_factory=dict, description="Keys of `fine_tune` to replace."
    )

    @model_validator(mode="after")
    def _scratch_settings_are_consistent(self) -> StrategyConfig:
        if self.epochs is not None and not self.from_scratch:
            raise ValueError(
                f"strategy {self.name!r}: epochs applies to a from_scratch strategy only; a "
                "transfer strategy trains for its feature_extraction and fine_tune epochs"
            )
        if self.from_scratch and ("weights" in self.base or self.fine_tune):
            raise ValueError(
                f"strategy {self.name!r}: a from_scratch strategy starts from random weights and has "
                "no fine-tuning stages; drop base.weights and fine_tune from it"
            )
        return self


class CompareConfig(Section):
    """`transferflow compare`: strategies trained on one data version, split and seed."""

    label_budgets: list[PositiveInt] = Field(
        default_factory=lambda: [10, 25, 100],
        description="Labelled training images per class, drawn per class from `seed`; each must "
        "fit the training split (the demo has 100 per class).",
    )
    full: bool = Field(
        False, description="Run at full_label_budgets instead (make compare FULL=1)."
    )
    full_label_budgets: list[PositiveInt] = Field(
        default_factory=lambda: [5, 10, 25, 50, 100],
        description="The budgets `full: true` (make compare FULL=1) runs instead.",
    )
    strategies: list[StrategyConfig] = Field(default_factory=list)
    seeds: list[int] | None = Field(
        None,
        description="Train every strategy at every budget once per seed; each seed draws its own "
        "labelled images, initialisation and shuffling (the split stays on `seed`). null: `seed` "
        "alone, with the test set's binomial interval.",
    )
    confidence: float = Field(
        0.95,
        ge=0.5,
        lt=1.0,
        description="Confidence of each strategy's interval: Student's t over the seeds, or the "
        "test set's interval for one seed. The winner is the cheapest strategy whose interval "
        "overlaps the best one's at the largest budget.",
    )
    workers: PositiveInt = Field(
        1,
        description="How many cells (a strategy at a budget) train at once, each in a worker "
        "process of its own (or, with work_pool, how many flow runs wait on the pool at once).",
    )
    cells_per_worker: PositiveInt = Field(
        16,
        description="A local worker process is replaced by a fresh one after this many cells: "
        "TensorFlow keeps per-model state that clearing the Keras session does not give back "
        "(20 to 60 MB a cell at 96 px), and each replacement costs a process start.",
    )
    threads_per_worker: PositiveInt | None = Field(
        None,
        description="TensorFlow threads (intra- and inter-op) in each worker process, local or a "
        "work pool's. null: for local workers, this machine's cores divided by workers, at least 1 "
        "(TensorFlow's default of every core in every worker makes the workers' threads spin "
        "waiting on each other); on a work pool, every core of the worker's machine. Scores repeat "
        "exactly only with the same thread count (it sets the order in which floats are summed): "
        "set it to compare tables made with different numbers of workers or engines.",
    )
    cell_timeout_minutes: PositiveInt = Field(
        120,
        description="With work_pool: how long to wait for one cell's flow run before the "
        "comparison fails, naming the cell (a lost worker otherwise holds it forever).",
    )
    work_pool: str | None = Field(
        None,
        min_length=1,
        description="Run each cell as a flow run of the deployment train-comparison-cell/<this> "
        "(`transferflow deploy-cells --pool <this>`) instead of in local worker processes.",
    )

    @field_validator("label_budgets", "full_label_budgets")
    @classmethod
    def _distinct_budgets(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("name at least one label budget")
        if len(set(value)) != len(value):
            raise ValueError(f"label budgets repeat: {value}")
        return sorted(value)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and not value:
            raise ValueError("name at least one seed, or null for the top-level seed")
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"seeds repeat: {value}")
        return value

    @field_validator("strategies")
    @classmethod
    def _distinct_names(cls, value: list[StrategyConfig]) -> list[StrategyConfig]:
        names = [strategy.name for strategy in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"strategy names must be unique; repeated: {', '.join(repeated)}")
        return value

    def budgets(self) -> list[int]:
        """The label budgets this run compares at, smallest first."""
        return self.full_label_budgets if self.full else self.label_budgets

    def seeds_or(self, seed: int) -> list[int]:
        """The seeds every cell trains with: `seeds`, or the pipeline's one `seed`."""
        return list(self.seeds) if self.seeds is not None else [seed]
