"""The pipeline's configuration tree: one pydantic model per stage, unknown keys rejected."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)


class Section(BaseModel):
    """A config section: typos fail loudly instead of being ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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


class TrackingConfig(Section):
    experiment: str = Field(
        "transfer-learning", min_length=1, description="The MLflow experiment of the runs."
    )
    resume: bool = Field(
        True,
        description="Start from a stage that a run in the experiment already finished with the "
        "same data, base, head, seed and settings, instead of training it again.",
    )
    heartbeat_seconds: int = Field(
        30,
        ge=1,
        description="How often a live run marks itself alive in MLflow. A RUNNING run with no "
        "heartbeat for five of these is taken for dead (killed, machine lost) and closed as "
        "KILLED by the next run in its experiment.",
    )


class TimeoutsConfig(Section):
    """How long one call to each server may take, its retries included, before the run fails.

    A run that fails on a lost server keeps what it finished: stages already logged resume when
    the same command runs again.
    """

    mlflow_seconds: int = Field(
        60,
        ge=20,
        description="One call to the MLflow tracking server (MLFLOW_TRACKING_URI), its four "
        "attempts included; each attempt may wait about a sixth of it for an answer.",
    )
    dvc_pull_seconds: int = Field(
        900, ge=10, description="The whole `dvc pull` of the pinned data from the DVC remote."
    )
    prefect_api_seconds: int = Field(
        60,
        ge=20,
        description="One call to the Prefect API (PREFECT_API_URL, or the local one), its three "
        "attempts included.",
    )


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


class ScheduleConfig(Section):
    """The retraining deployment that `transferflow serve` (`make serve`) registers with Prefect."""

    deployment_name: str = Field(
        "scheduled", min_length=1, description="Run it with retrain-classifier/<this name>."
    )
    cron: str = Field("0 3 * * 1", description="When it runs, five-field cron, in `timezone`.")
    timezone: str = Field("UTC", description="An IANA time zone, e.g. Europe/Berlin.")
    git_pull: bool = Field(
        False, description="`git pull --ff-only` the project before checking for changes."
    )

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from prefect.schedules import Cron  # the parser the Prefect server itself applies

        try:
            Cron(value)
        except ValueError as exc:
            raise ValueError(
                f"{exc}; expected five fields, e.g. '0 3 * * 1' (Monday 03:00)"
            ) from None
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}; use an IANA name such as UTC") from None
        return value


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


class PipelineConfig(Section):
    """The whole tree, as loaded from conf/*.yaml."""

    seed: int = Field(
        42, description="Draws the split and, without compare.seeds, everything else."
    )
    data: DataConfig = Field(default_factory=DataConfig)
    base: BaseModelConfig = Field(default_factory=BaseModelConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    feature_extraction: FeatureExtractionConfig = Field(default_factory=FeatureExtractionConfig)
    fine_tune: FineTuneConfig = Field(default_factory=FineTuneConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    demo: DemoDataConfig = Field(default_factory=DemoDataConfig)
    # Left out of every dump: how long to wait for a server changes nothing a run produces.
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig, exclude=True)
    # Left out of every dump too: moving the cron or the deployment name must not change the
    # config fingerprint, which would make the next scheduled run retrain.
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, exclude=True)
    # Left out of every dump: training runs' params and the registry's config fingerprint
    # stay what they were, whatever strategies a file declares.
    compare: CompareConfig = Field(default_factory=CompareConfig, exclude=True)

    def for_strategy(self, strategy: StrategyConfig) -> PipelineConfig:
        """The config one comparison strategy trains with: its section keys replace the file's."""
        tree = self.model_dump()
        for section in STRATEGY_SECTIONS:
            tree[section] = {**tree[section], **getattr(strategy, section)}
        if strategy.from_scratch:
            tree["base"]["weights"] = None
            tree["fine_tune"]["stages"] = []
        return PipelineConfig.model_validate(tree)

    @model_validator(mode="after")
    def _strategies_are_valid_configs(self) -> PipelineConfig:
        for strategy in self.compare.strategies:
            try:
                self.for_strategy(strategy)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
                    for error in exc.errors()
                )
                raise ValueError(f"compare.strategies {strategy.name!r}: {problems}") from None
        return self
