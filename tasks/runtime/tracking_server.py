"""Where runs are tracked: the store's URI, and whether its server answers.

Apart from tasks/tracking/runs.py so that the registry commands (promote, rollback) find and check
their store without loading Prefect, TensorFlow or MLflow's tracking machinery.
"""

from __future__ import annotations

import os
from pathlib import Path

from conf.errors import ExpectedError
from tasks.runtime.credentials import move_tracking_credentials, redact_url


def tracking_uri(project_root: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else a SQLite store in the project folder (never the cwd).

    A user and password in the URI move to MLflow's credential variables first (in os.environ,
    so worker processes inherit them): the URI returned, stored and shown carries none.
    """
    move_tracking_credentials()
    return (
        os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root.resolve() / 'mlflow.db'}"
    )


class TrackingServerUnreachableError(ExpectedError, RuntimeError):
    """The MLflow tracking server a run or registry action would use does not answer."""


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Fail at once, naming the server, when `uri` is an MLflow server that does not answer.

    MLflow's client retries a refused connection with back-off (4 min 7 s measured), so a
    training run would find out only after pulling data and building the model, and a promote
    or rollback would seem to hang. Any HTTP answer counts as there, even 401 or 404. Local
    stores (SQLite, folders) are not checked.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout, allow_redirects=False)
    except requests.RequestException as error:
        raise TrackingServerUnreachableError(
            f"The MLflow tracking server {redact_url(uri)} (MLFLOW_TRACKING_URI) does not answer"
            f" ({type(error).__name__}). Start it (`mlflow server`), point MLFLOW_TRACKING_URI"
            " at a running one, or unset it to track in the project's mlflow.db."
        ) from None
