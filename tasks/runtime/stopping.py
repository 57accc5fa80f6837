"""How this process was told to stop: the stop a signal asked for, and the exit status it means."""

from __future__ import annotations

import threading

from conf.errors import error_chain

# Set by the SIGTERM handlers of the CLI and of cell workers. Once a process is told to stop,
# the error that reaches an open run may be a consequence of the stop rather than the signal
# itself (a worker's pool torn down under it, TensorFlow turning the exit raised inside its
# input pipeline into an error of its own): the run was still killed, not failed.
_stop_requested = threading.Event()


def note_stop_requested() -> None:
    """Record that this process was told to stop: runs closed from now on are KILLED."""
    _stop_requested.set()


def stop_requested() -> bool:
    return _stop_requested.is_set()


def signal_exit_status(error: BaseException) -> int | None:
    """128 + the signal's number when `error` is how a signal stopped this process, or was
    raised while handling that; else None.

    Inside a flow, SIGTERM raises Prefect's TerminationSignal, and Prefect's own handling of it
    fails (ValueError: Task run is not set) when it lands while a task run is being created.
    Outside, this project's handlers raise SystemExit(128 + the signal's number).
    """
    # Here, not at the top: the CLI imports this module and must start without Prefect.
    from prefect.exceptions import TerminationSignal

    for link in error_chain(error):
        if isinstance(link, TerminationSignal):
            return 128 + link.signal
        if isinstance(link, KeyboardInterrupt):
            return 128 + 2
        if isinstance(link, SystemExit) and isinstance(link.code, int) and link.code > 128:
            return link.code
    return None
