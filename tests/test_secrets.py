"""Credentials in URLs are shown nowhere: not printed, logged, tagged, nor stored."""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks.runtime.credentials import move_tracking_credentials, redact_url
from tests.repositories import DVC, dvc_project, run
from tests.servers import free_port, mlflow_server
from tests.test_resume import train_command

_CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://alice:s3cret@mlflow.example.com:5000", "http://mlflow.example.com:5000"),
        ("https://alice:p%40ss@host/#/experiments/1", "https://host/#/experiments/1"),
        ("ssh://git@dvc.example.com/data", "ssh://dvc.example.com/data"),
        ("https://host/api?page=2&token=abc&access_key=k", "https://host/api?page=2"),
        (
            "https://bucket.s3.amazonaws.com/data.zip?versionId=3&X-Amz-Credential=AKIA%2F1"
            "&X-Amz-Signature=f00&X-Amz-Security-Token=t0k",
            "https://bucket.s3.amazonaws.com/data.zip?versionId=3",
        ),
        (
            "https://acct.blob.core.windows.net/c?sv=2022&sig=abc%3D",
            "https://acct.blob.core.windows.net/c?sv=2022",
        ),
        ("s3://bucket/dvc-store", "s3://bucket/dvc-store"),
        ("s3://AKIAKEY:secretkey@bucket/dvc-store", "s3://bucket/dvc-store"),
        (
            "https://user:pw@dav.example.com/remote.php/dav",
            "https://dav.example.com/remote.php/dav",
        ),
        ("sqlite:////srv/mlflow/mlflow.db", "sqlite:////srv/mlflow/mlflow.db"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("/mnt/dvc-remote", "/mnt/dvc-remote"),
        ("https://host/users/@me?page=1", "https://host/users/@me?page=1"),
    ],
)
def test_redact_url_drops_user_password_and_tokens_and_keeps_the_rest(url, shown) -> None:
    assert redact_url(url) == shown


def test_tracking_credentials_move_from_the_uri_to_mlflows_variables_decoded() -> None:
    environ = {"MLFLOW_TRACKING_URI": "http://alice:p%40ss%3Aw0rd@127.0.0.1:5000/"}
    move_tracking_credentials(environ)
    assert environ == {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000/",
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "p@ss:w0rd",
    }
    move_tracking_credentials(environ)  # once moved, nothing changes
    assert environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss:w0rd"


def test_tracking_credentials_already_set_win_and_a_username_alone_moves() -> None:
    environ = {
        "MLFLOW_TRACKING_URI": "https://alice:old@host",
        "MLFLOW_TRACKING_PASSWORD": "current",
    }
    move_tracking_credentials(environ)
    assert environ == {
        "MLFLOW_TRACKING_URI": "https://host",
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "current",
    }
    alone = {"MLFLOW_TRACKING_URI": "http://bob@host:5000"}
    move_tracking_credentials(alone)
    assert alone == {"MLFLOW_TRACKING_URI": "http://host:5000", "MLFLOW_TRACKING_USERNAME": "bob"}


@pytest.mark.parametrize(
    "uri", ["sqlite:////srv/mlflow.db", "databricks://profile", "postgresql://u:p@db/mlflow"]
)
def test_only_http_tracking_uris_are_rewritten(uri) -> None:
    environ = {"MLFLOW_TRACKING_URI": uri}
    move_tracking_credentials(environ)
    assert environ == {"MLFLOW_TRACKING_URI": uri}
    empty: dict[str, str] = {}
    move_tracking_credentials(empty)
    assert empty == {}


def test_mlflow_client_gets_the_moved_credentials_for_the_clean_uri(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The clean URI the project hands around still gets MLflow's client the user and password."""
    from mlflow.utils.credentials import get_default_host_creds

    from tasks.runtime.tracking_server import tracking_uri

    for name in _CREDENTIAL_VARIABLES:
        monkeypatch.setenv(name, "")  # not delenv: then monkeypatch unsets what the move sets
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@127.0.0.1:5000")
    uri = tracking_uri(tmp_path)
    assert uri == os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    creds = get_default_host_creds(uri)
    assert (creds.host, creds.username, creds.password) == (uri, "alice", "s3cret")


def test_a_dvc_remote_that_fails_is_named_without_its_password_or_token(tmp_path: Path) -> None:
    from tasks.data.versioning import DvcPullError, pull_data

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "labels.txt").write_text("boot\nshirt\n")
    run("git", "init", "-q", cwd=repo)
    run(DVC, "init", "-q", cwd=repo)
    run(DVC, "add", "-q", "data", cwd=repo)
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    url = f"http://dvcuser:Pw0rd@127.0.0.1:{free_port()}/store?token=T0ken&page=1"
    run(DVC, "remote", "add", "-d", "storage", url, cwd=repo)
    with pytest.raises(DvcPullError) as caught:
        pull_data(repo, "data.dvc")
    message = str(caught.value)
    assert "remote 'storage' (http://127.0.0.1:" in message and "/store?page=1)" in message
    assert "Pw0rd" not in message and "T0ken" not in message


# The smallest run through the whole flow: head, one fine-tune stage, register, promote.
TINY = {
    "extends": "default.yaml",
    "data": {"image_size": 32, "batch_size": 16},
    "feature_extraction": {"epochs": 2, "patience": 2},
    "fine_tune": {"stages": [{"unfreeze_blocks": 1, "epochs": 1}]},
    "registry": {"model_name": "secrets-test", "min_value": 0.0},
    "tracking": {"experiment": "secrets-test"},
    "demo": {"train_per_class": 4, "val_per_class": 2, "test_per_class": 2},
}


def files_holding(root: Path, *needles: bytes) -> list[str]:
    """Every file under `root` whose bytes contain any of `needles`."""
    return [
        str(path.relative_to(root))
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.is_symlink() and any(n in path.read_bytes() for n in needles)
    ]


@pytest.mark.slow
def test_a_password_in_the_tracking_uri_is_printed_logged_and_stored_nowhere(
    tmp_path: Path,
) -> None:
    """`transferflow train` against a server URI with `alice:<password>@`: the run reaches the
    server, and the password is in no output, no Prefect database, no MLflow store, no file."""
    project = dvc_project(tmp_path, TINY)
    (tmp_path / "mlflow-server").mkdir()
    password = secrets.token_urlsafe(18)
    needles = (password.encode(), base64.b64encode(f"alice:{password}".encode()))
    prefect_home = tmp_path / "prefect-home"
    with mlflow_server(tmp_path / "mlflow-server") as server:
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": server.replace("http://", f"http://alice:{password}@"),
            "PREFECT_HOME": str(prefect_home),  # its temporary server's database is a file here
            "PREFECT_LOGGING_LEVEL": "INFO",  # flow and task logs go to that database too
            "PYTHONUNBUFFERED": "1",
        }
        for name in (*_CREDENTIAL_VARIABLES, "PREFECT_API_URL"):
            env.pop(name, None)
        done = subprocess.run(
            train_command(project), cwd=project, env=env, capture_output=True, timeout=900
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, output.decode(errors="replace")[-6000:]

        client = MlflowClient(server)
        experiment = client.get_experiment_by_name("secrets-test")
        assert experiment is not None
        (parent,) = client.search_runs([experiment.experiment_id], "tags.strategy = 'fine_tune'")
        assert parent.info.status == "FINISHED"
        assert client.get_model_version("secrets-test", "1").run_id is not None

    assert f"on {server}".encode() in done.stdout  # the `MLflow run:` line, without the password
    assert not [needle for needle in needles if needle in output]
    # Prefect stored the run here (parameters, logs, the training-summary artifact's link to the
    # server), so a password stored with it would be found here too.
    prefect_files = [path.name for path in prefect_home.rglob("*")]
    assert "prefect.db" in prefect_files
    assert files_holding(prefect_home, server.encode())
    # tmp_path holds Prefect's home, the MLflow server's database, artifacts and log, and the
    # project with its .git, .dvc, .cache and reports.
    assert files_holding(tmp_path, *needles) == []
