"""Where runs are tracked: the store's URI, whether its server answers, and how a user opens it.

Apart from tasks/tracking/ so that the CLI and the registry commands (promote, rollback) find, check
and show their store without loading Prefect, TensorFlow or MLflow's tracking machinery: MLflow is
imported inside the functions that use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conf.errors import ExpectedError, error_chain
from tasks.runtime.credentials import move_tracking_credentials, redact_url

# MLflow 3's UI opens an experiment in its GenAI view unless the link asks for the training one.
TRAINING_VIEW = "workflowType=machine_learning"


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


class TrackingServerLostError(ExpectedError, RuntimeError):
    """The tracking server stopped answering in the middle of a run."""


def tracking_server_lost(
    error: BaseException, uri: str | None = None
) -> TrackingServerLostError | None:
    """`error` told as TrackingServerLostError when it came from a tracking server that no
    longer answers (MLflow's own message is its REST endpoint and urllib3's retry history)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")) or not _from_tracking_client(error):
        return None
    try:
        check_tracking_server(uri)
    except TrackingServerUnreachableError:
        return TrackingServerLostError(
            f"The MLflow tracking server {redact_url(uri)} (MLFLOW_TRACKING_URI) stopped answering during "
            "the run (each call gives up after timeouts.mlflow_seconds). Stages logged before it "
            "are checkpointed there: once it answers again, run the same command to resume "
            "from them."
        )
    return None


def _from_tracking_client(error: BaseException | None) -> bool:
    import requests
    from mlflow.exceptions import MlflowException

    return any(
        isinstance(link, MlflowException | requests.RequestException) for link in error_chain(error)
    )


def ui_hint(uri: str, project_root: Path, experiment_id: str | None = None) -> str:
    """How a user opens the MLflow UI on this tracking store: its URL, or the command to serve it.

    With `experiment_id`, the URL opens that experiment in the UI's training view (runs, charts,
    models); MLflow 3.17 would otherwise show its GenAI view (traces), empty here.
    """
    if uri.startswith(("http://", "https://")):
        server = redact_url(uri).rstrip("/")
        return (
            f"open {server}/{experiment_path(experiment_id)}" if experiment_id else f"open {server}"
        )
    artifacts = project_root.resolve() / "mlartifacts"
    command = (
        f"mlflow ui --backend-store-uri {redact_url(uri)} --default-artifact-root {artifacts} "
        "--host 127.0.0.1 --port 5000"
    )
    if experiment_id is None:
        return command
    return f"{command}, then open http://127.0.0.1:5000/{experiment_path(experiment_id)}"


def experiment_path(experiment_id: str) -> str:
    """The UI route of an experiment in its training view."""
    return f"#/experiments/{experiment_id}?{TRAINING_VIEW}"


@contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at `uri` for one block, then put everything back.

    mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which would send every later run in
    this process (another project's, a test's) to this store.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_uri, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)  # type: ignore[arg-type]  # None unsets it
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env
