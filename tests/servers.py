"""Real Prefect and MLflow tracking servers for the integration tests, on free loopback ports."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(command: list[str], log: Path, env: dict[str, str], cwd: Path = ROOT):
    """A server in a process group of its own, so that stopping it stops all its workers."""
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def tail(log: Path, characters: int = 4000) -> str:
    return log.read_text(errors="replace")[-characters:] if log.exists() else "(no log)"


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout} s:\n{tail(log)}")


def fresh_name(label: str) -> str:
    """A registered-model and experiment name that no other test on the shared server uses."""
    return f"{re.sub(r'[^A-Za-z0-9]+', '-', label)[:60]}-{uuid.uuid4().hex[:8]}"


def mlflow_server_command(
    backend_store_uri: str, artifacts_destination: str, port: int
) -> list[str]:
    """`mlflow server` as a team runs it (deploy/compose.yaml): a database backend, and the
    artifacts proxied by the server, so clients need its URL and nothing else."""
    return [
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        artifacts_destination,
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


@contextmanager
def mlflow_server(base: Path) -> Iterator[str]:
    """`mlflow server` with a SQLite backend and proxied artifacts in `base`; yields its URL."""
    port = free_port()
    # The job runner (GenAI evaluation jobs, trace roll-ups) is seven more processes that poll; on
    # two cores they slowed every request from ~15 ms to ~200 ms. The pipeline never submits a job.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = mlflow_server_command(
        f"sqlite:///{base / 'mlflow.db'}", str(base / "mlartifacts"), port
    )
    server = start(
        [str(BIN / command[0]), *command[1:]],
        base / "mlflow.log",
        env,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", server, base / "mlflow.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)


@contextmanager
def prefect_server(base: Path) -> Iterator[str]:
    """`prefect server start` with its own PREFECT_HOME in `base`; yields its API URL."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    # As `make prefect-server` does: without it the server's UI would look for the API on 4200.
    env = {**os.environ, "PREFECT_HOME": str(base / "prefect-server"), "PREFECT_UI_API_URL": api}
    env.pop("PREFECT_API_URL", None)
    server = start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        base / "prefect.log",
        env,
    )
    try:
        wait_healthy(f"{api}/health", server, base / "prefect.log")
        yield api
    finally:
        stop(server)
