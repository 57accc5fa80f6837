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


def test_the_workers_start_with_the_pool_and_stop_with_it_even_without_a_cell() -> None:
    """Workers start before the first cell is handed out (their TensorFlow import overlaps the
    first cell); a comparison that fails before any cell still leaves no process behind."""
    from conf.schema import CompareConfig
    from tasks.cells import cell_task_runner

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

    from conf.schema import CompareConfig
    from tasks.cells import cell_task_runner

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
