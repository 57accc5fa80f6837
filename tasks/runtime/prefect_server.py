"""Prefect's temporary local server, tied to the life of the process that starts it.

Without PREFECT_API_URL, Prefect starts a server in a child process and stops it at exit.
A process killed with SIGKILL never gets to exit, and the server lived on. Here a small
watchdog process holds the read end of a pipe whose write end only this process has: when
this process ends, however it ends, the pipe closes and the watchdog stops the server.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from conf.errors import error_chain

# Runs in the watchdog: wait for the pipe to close, then stop the server (SIGTERM, then
# SIGKILL), but only while the pid still names a Prefect server, not a process that reused it.
_WATCHDOG = """
import os, signal, sys, time
pid = int(sys.argv[1])
sys.stdin.buffer.read()
def is_server():
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"prefect.server" in cmdline.read()
    except FileNotFoundError:
        return not os.path.isdir("/proc")
for sent in (signal.SIGTERM, signal.SIGKILL):
    try:
        if not is_server():
            break
        os.kill(pid, sent)
    except ProcessLookupError:
        break
    for _ in range(50):
        time.sleep(0.1)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit(0)
"""

_watchdogs: list[subprocess.Popen] = []


@contextmanager
def local_prefect_server() -> Iterator[Callable[[], None]]:
    """Within the block, once its `ready()` returned, PREFECT_API_URL names a Prefect server
    that stops with this process.

    Without PREFECT_API_URL, Prefect's temporary server starts here, in a thread, so that
    what the block does before `ready()` (importing TensorFlow, say) overlaps the server's
    start; `ready()` waits for it (raising what stopped it) and sets PREFECT_API_URL to it, in
    the settings and the environment: worker processes started in the block then report to it,
    instead of each starting a server of its own.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        yield lambda: None
        return
    # Imported here, not in the thread: the thread would hold the import lock and contend for
    # the interpreter with the block's own imports, and the server's process would start last.
    import prefect.server.api.server  # noqa: F401

    started: list[str] = []
    failed: list[BaseException] = []

    def start() -> None:
        try:
            started.append(_start_watched_server())
        except BaseException as error:  # handed to ready(), in the block's thread
            failed.append(error)

    starting = threading.Thread(  # with this thread's Prefect settings (a new one has none)
        target=contextvars.copy_context().run, args=(start,), name="prefect-server-start"
    )
    starting.start()
    saved = os.environ.get("PREFECT_API_URL")
    with contextlib.ExitStack() as stack:

        def ready() -> None:
            starting.join()
            if failed:
                raise failed[0]
            if os.environ.get("PREFECT_API_URL") == started[0]:
                return
            os.environ["PREFECT_API_URL"] = started[0]
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: started[0]}))

        try:
            yield ready
        finally:
            starting.join()  # a server whose start the block did not wait for still stops
            if saved is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = saved


def stop_local_server() -> None:
    """Stop the temporary server this process started, now rather than at exit, if it did."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the process's one temporary server, or a new idle one
    if server.server_process is not None:
        server.stop()


def _start_watched_server() -> str:
    """Start Prefect's temporary server (one per process) and a watchdog for it; its API URL."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    if server.server_process is not None and not _watchdogs:
        watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(server.server_process.pid)],
            stdin=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C on the terminal must not stop it before the server
        )
        _watchdogs.append(watchdog)  # the pipe stays open while this process holds the object
    return server.api_url


# Statuses a busy or restarting Prefect server answers with; Prefect's client retries them too.
_BUSY_STATUSES = {408, 429, 500, 502, 503, 504}


def lost_prefect_call(error: BaseException | None) -> bool:
    """Whether `error`, or an error it came from, is a Prefect API call the server never answered
    or answered busy, for example SQLite locked under a loaded temporary server (503).

    Such a failure says nothing about the work itself: the work may run again.
    """
    import httpx

    for link in error_chain(error):
        if isinstance(link, httpx.TransportError):
            return True
        if isinstance(link, httpx.HTTPStatusError):
            return link.response.status_code in _BUSY_STATUSES
    return False


def after_lost_prefect_call(task, task_run, state) -> bool:
    """A task's `retry_condition_fn`: retry only when it failed on a lost Prefect API call."""
    error = state.data if isinstance(state.data, BaseException) else None
    return lost_prefect_call(error)
