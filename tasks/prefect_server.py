"""Prefect's temporary local server, tied to the life of the process that starts it.

Without PREFECT_API_URL, Prefect starts a server in a child process and stops it at exit.
A process killed with SIGKILL never gets to exit, and the server lived on. Here a small
watchdog process holds the read end of a pipe whose write end only this process has: when
this process ends, however it ends, the pipe closes and the watchdog stops the server.
"""

from __future__ import annotations

import subprocess
import sys

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


def start_local_prefect_server() -> None:
    """Start Prefect's temporary server now, unless PREFECT_API_URL names one; stop it with us.

    Prefect would start the same server (one per process) at the first API call; starting it
    here is what lets the watchdog know its pid.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return
    server = SubprocessASGIServer()
    server.start()
    if server.server_process is None:  # pragma: no cover - start() raises instead
        return
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(server.server_process.pid)],
        stdin=subprocess.PIPE,
        start_new_session=True,  # Ctrl-C on the terminal must not stop it before the server
    )
    _watchdogs.append(watchdog)  # the pipe stays open while this process holds the object
