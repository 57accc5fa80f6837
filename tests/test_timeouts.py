"""Server budgets: MLflow's retries sized to the budget, and a deadline for clients without one."""

from __future__ import annotations

import time

import pytest

from tasks.runtime.timeouts import ServerTimeoutError, bound_mlflow_calls, call_within


@pytest.mark.parametrize("budget", [20, 30, 45, 60, 120, 900])
def test_mlflow_retries_fit_in_the_budget(budget: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four attempts that each wait the full timeout, urllib3's back-off (0, 2f, 4f) and its
    jitter (up to 1 s per sleep) still end within the budget."""
    for name in ("TIMEOUT", "MAX_RETRIES", "BACKOFF_FACTOR", "BACKOFF_JITTER"):
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}", raising=False)
    bound_mlflow_calls(budget)
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_BACKOFF_JITTER,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    attempts = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() + 1
    factor = MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()
    sleeps = sum(factor * 2 ** (n - 1) for n in range(2, attempts))
    jitter = MLFLOW_HTTP_REQUEST_BACKOFF_JITTER.get() * (attempts - 2)
    worst = attempts * MLFLOW_HTTP_REQUEST_TIMEOUT.get() + sleeps + jitter
    assert attempts >= 3 and worst <= budget


def test_call_within_returns_raises_or_gives_up_at_the_deadline() -> None:
    assert call_within(5, "unused", lambda: 42) == 42
    with pytest.raises(KeyError):
        call_within(5, "unused", lambda: {}["missing"])
    started = time.monotonic()
    with pytest.raises(ServerTimeoutError, match="the remote does not answer"):
        call_within(0.5, "the remote does not answer", lambda: time.sleep(30))
    assert time.monotonic() - started < 5
