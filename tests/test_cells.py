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


def test_ready_cells_start_by_priority_and_a_failed_cell_s_followers_never_start() -> None:
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    from tasks.cells import CellSpec, cell_id, hand_out_cells

    def cell(name: str, priority: int, *after: str) -> CellSpec:
        return CellSpec(
            config_path="/x.yaml",
            strategy=name,
            labels_per_class=10,
            seed=1,
            comparison_id="c",
            data_version="v",
            after=tuple(cell_id(a, 10, 1) for a in after),
            priority=priority,
        )

    started: list[str] = []

    @task
    def train(spec: CellSpec) -> str:
        started.append(spec.strategy)
        if spec.strategy == "broken":
            raise RuntimeError("this cell fails")
        return spec.strategy

    cells = [
        cell("head", 90),
        cell("shallow", 20, "head"),
        cell("deeper", 10, "shallow"),
        cell("broken", 60, "head"),
        cell("after_broken", 50, "broken"),
        cell("lone", 40),
    ]

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=1))
    def hand_out() -> dict[str, str]:
        futures = hand_out_cells(cells, train.submit, slots=1)
        return {key: future.state.type.value for key, future in futures.items()}

    states = hand_out()
    # Highest priority among the ready cells first; a cell only after the ones it follows.
    assert started == ["head", "broken", "lone", "shallow", "deeper"]
    assert "after_broken@10/seed=1" not in states
    assert states["broken@10/seed=1"] == "FAILED"
    assert states["deeper@10/seed=1"] == "COMPLETED"
