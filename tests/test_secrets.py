"""Credentials in URLs are shown nowhere: not printed, logged, tagged, nor stored."""

from __future__ import annotations

import pytest

from tasks.credentials import move_tracking_credentials, redact_url


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
