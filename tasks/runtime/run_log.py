"""A run's story as it happens: stage scores, epochs and the gate's decision, in the run's log.

The lines are the ones the `transferflow` command prints at the end, so the Prefect UI's log of a
flow run and the terminal tell the same story.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect logger of the task or flow run in progress (its lines reach the UI); outside
    a run, this module's standard logger."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def stage_line(stage: str, accuracy: float, macro_f1: float, epochs: int, seconds: float) -> str:
    """One stage's test scores, effort and time, e.g. `fine_tune_1  accuracy 0.8123 ...`."""
    return (
        f"{stage:<20} accuracy {accuracy:.4f}  macro-F1 {macro_f1:.4f}  "
        f"({epochs} epochs, {seconds:.0f} s)"
    )


def resumed_line(stage: str, run_id: str) -> str:
    return f"{stage} from run {run_id} (already trained)"


def registration_line(name: str, version: str, promoted: bool) -> str:
    """Which version the run registered and whether the gate made it the champion."""
    outcome = "now the champion" if promoted else "not promoted"
    return f"{name} version {version}, alias 'challenger', {outcome}"


def epoch_line(stage: str, epoch: int, epochs: int, logs: Mapping[str, float]) -> str:
    """One epoch's Keras metrics, e.g. `fine_tune_1 epoch 2/4: loss 0.6931, accuracy ...`:
    training before validation, each with its loss first (Keras gives them sorted by name)."""
    shown = sorted(
        logs, key=lambda name: (name.startswith("val_"), name.removeprefix("val_") != "loss", name)
    )
    metrics = ", ".join(f"{name} {float(logs[name]):.4f}" for name in shown)
    return f"{stage} epoch {epoch}/{epochs}: {metrics}"
