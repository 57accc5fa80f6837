"""Local worker processes for cells: a recycling process pool, TensorFlow threads, signals, parent watch."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

# A worker process imports this module to run start_worker: importing what its cells run here
# does TensorFlow's import while the worker waits for its first cell.
import tasks.comparison.cell_training  # noqa: F401
from conf.compare import CompareConfig
from tasks.runtime.stopping import note_stop_requested


def cell_task_runner(compare: CompareConfig):
    """Local worker processes, or (with a work pool) threads that wait on the pool's flow runs.

    Worker processes report to the Prefect API this process uses, its temporary server too:
    left alone, each would start a temporary server of its own.
    """
    if compare.work_pool:
        return ThreadPoolTaskRunner(max_workers=compare.workers)
    runner = RecyclingProcessPoolTaskRunner(
        max_workers=compare.workers,
        initializer=start_worker,
        initargs=(prefect_api_url(), threads_per_worker(compare)),
    )
    runner.tasks_per_worker = compare.cells_per_worker
    return runner


class RecyclingProcessPoolTaskRunner(ProcessPoolTaskRunner):
    """Prefect's process pool, each worker process replaced after `tasks_per_worker` tasks.

    A worker grows with every model it trains (TensorFlow keeps per-model state that
    `clear_session` does not return), so a long grid would grow it without bound.
    """

    tasks_per_worker: int | None = None

    def duplicate(self):
        copy = super().duplicate()
        copy.tasks_per_worker = self.tasks_per_worker
        return copy

    def __enter__(self):
        super().__enter__()
        # The executor starts no process before its first task: replace it with one that
        # recycles, keeping the start method, initializer and arguments Prefect gave it.
        given = self._executor
        if given is not None and self.tasks_per_worker is not None:
            self._executor = _RecyclingExecutor(
                max_workers=given._max_workers,  # type: ignore[attr-defined]
                mp_context=given._mp_context,  # type: ignore[attr-defined]
                initializer=given._initializer,  # type: ignore[attr-defined]
                initargs=given._initargs,  # type: ignore[attr-defined]
                max_tasks_per_child=self.tasks_per_worker,
            )
            given.shutdown(wait=True)
        if not _in_worker.is_set():
            _start_workers_now(self._executor)
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        executor = self._executor
        if exc_type is None or issubclass(exc_type, Exception) or executor is None:
            super().__exit__(exc_type, exc_value, traceback)
            return
        # Stopped by a signal. Prefect's pool would wait for the cells in flight to finish, and
        # for the threads that hold queued cells until the cells they follow are done, which
        # may be never. Pass the signal on, so the cells in flight close their runs as KILLED
        # and their workers end (each within 10 s, see start_worker), then wait for nothing
        # else: the command exits without joining those threads (flows/cli.py).
        note_stop_requested()
        workers = list(getattr(executor, "_processes", {}).values())
        for process in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in workers:
            process.join(max(0.0, deadline - time.monotonic()))
        executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None
        resolver = getattr(self, "_resolver_executor", None)
        if resolver is not None:
            resolver.shutdown(wait=False, cancel_futures=True)
            self._resolver_executor = None
        self._stop_message_forwarding()
        TaskRunner.__exit__(self, exc_type, exc_value, traceback)


def _start_workers_now(executor) -> None:
    """Start every worker process now, not when its first cell is handed out.

    A worker's start (Python, then TensorFlow's import with this module, about 10 s on 2 cores)
    then overlaps the first cell, which every other cell waits for. The pool's manager thread
    starts with them, so that shutting the pool down stops them even if no cell ever came.
    Not in a worker: Prefect enters a copy of the flow's task runner around each task it runs
    there, and that copy runs nothing.
    """
    launch = getattr(executor, "_launch_processes", None)
    manage = getattr(executor, "_start_executor_manager_thread", None)
    if launch is None or manage is None or executor._executor_manager_thread is not None:
        return  # a Python whose pool has other internals: workers start with their first cell
    launch()
    manage()


def threads_per_worker(compare: CompareConfig) -> int:
    """TensorFlow threads for each local worker: as set, or this machine's cores shared out.

    Each of TensorFlow's thread pools defaults to every core, so N workers would run N times
    as many threads as there are cores; they then spin waiting on each other, and a comparison
    spends a sixth more CPU time on 2 cores (docs/performance.md).
    """
    if compare.threads_per_worker is not None:
        return compare.threads_per_worker
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // compare.workers)


def prefect_api_url() -> str | None:
    """PREFECT_API_URL as this process sees it, or the address of its temporary server."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url:
        return url
    server = SubprocessASGIServer()  # the process's one temporary server, if it started one
    return server.api_url if server.running else None


# Set in a worker process by start_worker.
_in_worker = threading.Event()


def start_worker(url: str | None, threads: int) -> None:
    """A worker process's set-up: the parent's Prefect API, TensorFlow's `threads` (before
    it runs anything), and ending with the parent.

    On SIGTERM the cell in flight stops with SystemExit, so its runs close as KILLED; a
    worker whose parent died (even by SIGKILL) sends itself SIGTERM rather than train on
    for no one. Whatever the cell does, the process is gone 10 s after the signal (Prefect
    would otherwise go on retrying to send its last events to a server that has stopped).
    """
    _in_worker.set()
    use_prefect_api(url)
    signal.signal(signal.SIGTERM, _leave_on_sigterm)
    parent = os.getppid()
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    use_tensorflow_threads(threads)


def use_tensorflow_threads(threads: int | None) -> None:
    """TensorFlow's intra- and inter-op thread pools in this process, set before it runs any
    operation; None keeps TensorFlow's default (every core)."""
    if threads is None:
        return
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def _leave_on_sigterm(signum: int, frame) -> None:
    exit_code = 128 + signum
    note_stop_requested()
    deadline = threading.Timer(10, os._exit, args=(exit_code,))
    deadline.daemon = True  # a worker that ends sooner must not wait for it
    deadline.start()
    raise SystemExit(exit_code)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(2)
    os.kill(os.getpid(), signal.SIGTERM)


def use_prefect_api(url: str | None) -> None:
    """In a worker process, before any task: talk to `url` (the parent's Prefect API).

    Task events and logs then go straight there too. Relayed through the parent, they would be
    sent by a thread that sees only the parent's global settings, not settings a caller set for
    the flow (`temporary_settings`), and could land on another server than the flow run.
    """
    if not url:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import set_api_log_sink

    os.environ["PREFECT_API_URL"] = url
    EventsWorker.set_client_override(None)
    set_api_log_sink(None)


class _RecyclingExecutor(ProcessPoolExecutor):
    """A process pool that starts a replacement whenever it has fewer processes than allowed.

    CPython 3.11's pool skips the replacement for a worker that left after its last task when it
    counts an idle worker, and that count can be the leaving worker's own: queued tasks then
    wait forever with no process to run them (seen here with queued cells).
    """

    def _adjust_process_count(self) -> None:
        idle = self._idle_worker_semaphore.acquire(blocking=False)  # type: ignore[attr-defined]
        if len(self._processes) < self._max_workers:  # type: ignore[attr-defined]
            self._spawn_process()  # type: ignore[attr-defined]
        elif idle:
            return
