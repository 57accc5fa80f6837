"""Time budgets for the servers a run depends on: MLflow, DVC's remote and the Prefect API.

Each client retries on its own, with back-off (MLflow's for 4 min, Prefect's for 6), and a
step retried on top multiplies that. Here each client's own retries are sized to fit the
budget in `timeouts:`, and the steps that talk to a server do not retry what the client
already did.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from conf.errors import ExpectedError

Result = TypeVar("Result")

# Attempts per call: a blip is retried, a lost server is given up on within the budget.
_RETRIES = 3


class ServerTimeoutError(ExpectedError, TimeoutError):
    """A server did not finish a call within its budget in `timeouts:`."""


def retry_if_store_locked(task, task_run, state) -> bool:
    """Retry a tracking step only when a local SQLite store was locked by another writer.

    MLflow's HTTP client already retries a tracking server within timeouts.mlflow_seconds;
    retrying the step as well would multiply that budget.
    """
    try:
        state.result()
    except Exception as error:
        return "database is locked" in str(error)
    return False


def bound_mlflow_calls(seconds: int) -> None:
    """Size MLflow's HTTP retries so one REST call gives up within about `seconds`.

    urllib3 sleeps 0, 2f and 4f seconds (plus up to 1 s of jitter) between the four attempts,
    and each attempt may wait `timeout` for an answer: 4 * timeout + 6f + 2 <= seconds. Set in
    the environment, where MLflow reads it on every call and worker processes inherit it.
    """
    factor = max(1, seconds // 20)
    timeout = max(2, (seconds - 6 * factor - 2) // (_RETRIES + 1))
    os.environ.update(
        {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(_RETRIES),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(factor),
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout),
        }
    )


@contextmanager
def bounded_prefect_calls(seconds: int) -> Iterator[None]:
    """Within the block, one Prefect API call gives up within about `seconds`.

    Prefect's client sleeps 2 and 4 s (plus 20% jitter) between three attempts here. The
    settings apply to this process through Prefect's settings context (read once at import)
    and to worker processes started in the block through the environment.
    """
    from prefect.settings import (
        PREFECT_API_REQUEST_TIMEOUT,
        PREFECT_CLIENT_MAX_RETRIES,
        temporary_settings,
    )

    retries = 2
    timeout = max(2.0, (seconds - 8) / (retries + 1))
    names = ("PREFECT_API_REQUEST_TIMEOUT", "PREFECT_CLIENT_MAX_RETRIES")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict(zip(names, (str(timeout), str(retries)), strict=True)))
    try:
        with temporary_settings(
            updates={PREFECT_API_REQUEST_TIMEOUT: timeout, PREFECT_CLIENT_MAX_RETRIES: retries}
        ):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def call_within(seconds: float, failure: str, function: Callable[[], Result]) -> Result:
    """`function()`, or ServerTimeoutError with the message `failure` after `seconds`.

    For clients with no budget of their own (DVC's remotes): the call runs in a daemon
    thread, so a call that never returns is left behind and does not hold up the process's exit.
    """
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed to the caller's thread below
            outcome["error"] = error

    worker = threading.Thread(target=run, name="bounded-call", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise ServerTimeoutError(failure)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]  # a BaseException, by construction
    return outcome["value"]  # type: ignore[return-value]  # function's own result
