"""What a stage leaves to record: its per-epoch history and its headline figures."""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.inference.evaluate import Evaluation
from tasks.runtime.run_log import stage_line


@dataclass(frozen=True)
class TrainingHistory:
    """Per-epoch metrics of one stage (Keras names: loss, accuracy, val_loss, val_accuracy)."""

    epochs: dict[str, tuple[float, ...]]
    best_epoch: int
    seconds: float
    trainable_params: int
    learning_rate: float
    stopped_early: bool = field(default=False)

    @property
    def epochs_run(self) -> int:
        return len(self.epochs.get("loss", ()))


@dataclass(frozen=True)
class StageResult:
    """A trained stage: its per-epoch history and its scores on the held-out test split."""

    history: TrainingHistory
    evaluation: Evaluation


@dataclass(frozen=True)
class StageSummary:
    """One stage's headline figures."""

    stage: str
    test_accuracy: float
    test_macro_f1: float
    trainable_params: int
    learning_rate: float
    epochs_run: int
    train_seconds: float

    @classmethod
    def of(cls, stage: str, history: TrainingHistory, evaluation: Evaluation) -> StageSummary:
        return cls(
            stage=stage,
            test_accuracy=evaluation.accuracy,
            test_macro_f1=evaluation.macro_f1,
            trainable_params=history.trainable_params,
            learning_rate=history.learning_rate,
            epochs_run=history.epochs_run,
            train_seconds=history.seconds,
        )

    def line(self) -> str:
        """The stage's line in the run's log and the command's output."""
        return stage_line(
            self.stage, self.test_accuracy, self.test_macro_f1, self.epochs_run, self.train_seconds
        )
