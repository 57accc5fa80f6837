"""Comparison workers: a worker process replaced after its cells never leaves queued cells waiting."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from tasks.comparison.workers import _RecyclingExecutor

pytestmark = pytest.mark.integration


def test_a_worker_that_leaves_after_its_tasks_is_replaced_while_tasks_wait() -> None:
    # One worker, two tasks per process, three tasks queued at once: CPython 3.11's own pool
    # hangs on the third (it takes the leaving worker for an idle one).
    pool = _RecyclingExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=2
    )
    try:
        futures = [pool.submit(os.getpid) for _ in range(3)]
        pids = [future.result(timeout=120) for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    assert pids[0] == pids[1] != pids[2]


def test_the_workers_start_with_the_pool_and_stop_with_it_even_without_a_cell() -> None:
    """Workers start before the first cell is handed out (their TensorFlow import overlaps the
    first cell); a comparison that fails before any cell still leaves no process behind."""
    from conf.compare import CompareConfig
    from tasks.comparison.workers import cell_task_runner

    runner = cell_task_runner(CompareConfig(workers=2))
    with runner:
        started = multiprocessing.active_children()
        assert len(started) == 2
    assert not multiprocessing.active_children()
    assert not any(process.is_alive() for process in started)


def test_each_worker_s_tensorflow_runs_on_its_share_of_the_cores() -> None:
    """Two workers on this machine's cores get half of them each (TensorFlow's default of every
    core in every worker oversubscribes them); a set value wins."""
    import tensorflow as tf

    from conf.compare import CompareConfig
    from tasks.comparison.workers import cell_task_runner

    cores = len(os.sched_getaffinity(0))
    for compare, expected in (
        (CompareConfig(workers=2), max(1, cores // 2)),
        (CompareConfig(workers=1, threads_per_worker=3), 3),
    ):
        with cell_task_runner(compare) as runner:
            threads = runner._executor.submit(
                tf.config.threading.get_intra_op_parallelism_threads
            ).result(timeout=120)
            between = runner._executor.submit(
                tf.config.threading.get_inter_op_parallelism_threads
            ).result(timeout=120)
        assert (threads, between) == (expected, expected)


def _busy_server_error(status: int):
    """The error Prefect's client raises when its server answers `status` to a slot request."""
    import httpx
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.exceptions import PrefectHTTPStatusError

    url = "http://127.0.0.1:4200/api/v2/concurrency_limits/increment-with-lease"
    request = httpx.Request("POST", url)
    response = httpx.Response(status, request=request, json={"exception_message": "busy"})
    http = httpx.HTTPStatusError("busy", request=request, response=response)
    try:
        try:
            raise PrefectHTTPStatusError.from_httpx_error(http)
        except PrefectHTTPStatusError as cause:
            raise ConcurrencySlotAcquisitionError(f"Unable to acquire slots: {status}") from cause
    except ConcurrencySlotAcquisitionError as error:
        return error


def test_a_cell_that_met_a_busy_prefect_server_runs_again_and_one_that_failed_does_not(
    prefect_api: str, monkeypatch
) -> None:
    """A 503 from a loaded Prefect server (seen at the last cell of `make compare`) costs the
    cell one more try from its finished stages, not the comparison; a real error is not retried."""
    from prefect import flow, task

    from tasks.comparison.cell_training import train_cell_step

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    attempts: dict[str, int] = {}

    def failing_once(name: str, error: BaseException) -> str:
        attempts[name] = attempts.get(name, 0) + 1
        if attempts[name] == 1:
            raise error
        return name

    # The cell's own retry policy, around a body that fails the way the cell's tasks do.
    as_a_cell = task(
        failing_once,
        retries=train_cell_step.retries,
        retry_condition_fn=train_cell_step.retry_condition_fn,
        retry_delay_seconds=0,
    )

    @flow
    def cells() -> list[str]:
        names = []
        for name, error in (
            ("busy", _busy_server_error(503)),
            ("not-found", _busy_server_error(404)),
            ("bad-data", ValueError("an image cannot be decoded")),
        ):
            state = as_a_cell(name, error, return_state=True)
            names.append(f"{name}:{state.type.value}")
        return names

    assert cells() == ["busy:COMPLETED", "not-found:FAILED", "bad-data:FAILED"]
    assert attempts == {"busy": 2, "not-found": 1, "bad-data": 1}
