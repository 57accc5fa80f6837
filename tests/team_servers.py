"""A team's shared services on this machine: PostgreSQL, an S3 endpoint, and MLflow on both.

PostgreSQL is Debian's own server (`initdb`, `postgres`) in a temporary data directory; the S3
endpoint is moto's standalone server. Both listen on free loopback ports and stop with the test
session. `deploy/compose.yaml` declares the same services for real machines, and a test checks
that its commands and environment match the ones below.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.servers import BIN, free_port, mlflow_server_command, start, stop, tail, wait_healthy

# moto accepts any key; these only have to reach the places a team's real keys would.
S3_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    access_key_id: str
    secret_access_key: str

    def env(self) -> dict[str, str]:
        """The variables boto3 (MLflow's server) reads to reach this endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": S3_REGION,
            "MLFLOW_S3_ENDPOINT_URL": self.url,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=S3_REGION,
        )


def postgres_binaries() -> Path | None:
    """The folder of Debian's PostgreSQL server programs, or None when it is not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


def _as_postgres_user() -> dict:
    """PostgreSQL refuses to run as root: as root, run it as the package's `postgres` user."""
    if os.geteuid() != 0:
        return {}
    account = pwd.getpwnam("postgres")
    return {"user": account.pw_uid, "group": account.pw_gid}


@contextmanager
def postgres_server(log_dir: Path) -> Iterator[str]:
    """A PostgreSQL server with one database `mlflow`; yields its SQLAlchemy URL (psycopg 3)."""
    binaries = postgres_binaries()
    assert binaries is not None, "PostgreSQL is not installed"
    owner = _as_postgres_user()
    # Not under pytest's tmp_path: as root, that folder is closed to the postgres user.
    data = Path(tempfile.mkdtemp(prefix="transferflow-pg-"))
    if owner:
        os.chown(data, owner["user"], owner["group"])
    port = free_port()
    log = log_dir / "postgres.log"
    subprocess.run(
        [str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
        **owner,
    )
    with log.open("wb") as out:
        server = subprocess.Popen(
            [
                str(binaries / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-k",
                str(data),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",  # a test database: nothing to keep after a crash
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **owner,
        )
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/mlflow"
    try:
        _create_database(port, server, log)
        yield url
    finally:
        stop(server)
        shutil.rmtree(data, ignore_errors=True)


def _create_database(port: int, server: subprocess.Popen, log: Path, budget: float = 60) -> None:
    import psycopg

    deadline = time.monotonic() + budget
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"postgres exited with {server.returncode}:\n{tail(log)}")
        try:
            with psycopg.connect(
                host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True
            ) as connection:
                connection.execute("CREATE DATABASE mlflow")
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL not ready after {budget} s:\n{tail(log)}") from None
            time.sleep(0.5)


def query(url: str, sql: str, *parameters) -> list[tuple]:
    """Rows of one SQL query on the database behind an SQLAlchemy URL."""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as connection:
        return connection.execute(sql, parameters).fetchall()


@contextmanager
def s3_server(log_dir: Path, buckets: list[str], secret_access_key: str) -> Iterator[S3Endpoint]:
    """moto's S3 server with `buckets` created; yields how to reach it."""
    port = free_port()
    log = log_dir / "moto.log"
    server = start(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log, dict(os.environ)
    )
    endpoint = S3Endpoint(f"http://127.0.0.1:{port}", "team-key-id", secret_access_key)
    try:
        wait_healthy(f"{endpoint.url}/moto-api/", server, log, timeout=60)
        for bucket in buckets:
            endpoint.client().create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        stop(server)


@contextmanager
def team_mlflow_server(
    log_dir: Path, backend_store_uri: str, artifacts_destination: str, s3: S3Endpoint
) -> Iterator[str]:
    """The team's MLflow server; only it holds S3 credentials. Yields its URL."""
    port = free_port()
    log = log_dir / "mlflow-team.log"
    env = {**os.environ, **s3.env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = mlflow_server_command(backend_store_uri, artifacts_destination, port)
    # The server runs from an empty folder, so a default store it made by mistake would show.
    server = start([str(BIN / command[0]), *command[1:]], log, env, cwd=log_dir)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", server, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)
