"""Comparison workers: a worker process replaced after its cells never leaves queued cells waiting."""

from __future__ import annotations

import multiprocessing
import os

from tasks.cells import _RecyclingExecutor


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
