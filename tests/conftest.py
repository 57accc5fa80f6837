"""Test-run environment: every service and cache in folders the test run owns, nothing downloaded."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import fresh_name, mlflow_server, prefect_server

# Set before anything imports keras, prefect or mlflow: they read these at import or first use.
_RUN_DIR = Path(tempfile.mkdtemp(prefix="transferflow-tests-"))
_KERAS_HOME = _RUN_DIR / "keras"
(_KERAS_HOME / "models").mkdir(parents=True)
os.environ.update(
    {
        "KERAS_HOME": str(_KERAS_HOME),
        "PREFECT_HOME": str(_RUN_DIR / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "DVC_NO_ANALYTICS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)

# The genuine ImageNet weights, when the run provides them (.ci/run does).
WEIGHTS_DIR = os.environ.get("TRANSFERFLOW_TEST_WEIGHTS_DIR")
MOBILENET_NO_TOP = "mobilenet_2_5_224_tf_no_top.h5"
if WEIGHTS_DIR and (Path(WEIGHTS_DIR) / MOBILENET_NO_TOP).is_file():
    shutil.copy(Path(WEIGHTS_DIR) / MOBILENET_NO_TOP, _KERAS_HOME / "models" / MOBILENET_NO_TOP)

HAVE_IMAGENET_WEIGHTS = (_KERAS_HOME / "models" / MOBILENET_NO_TOP).is_file()
needs_imagenet_weights = pytest.mark.skipif(
    not HAVE_IMAGENET_WEIGHTS,
    reason="set TRANSFERFLOW_TEST_WEIGHTS_DIR to a folder holding " + MOBILENET_NO_TOP,
)


@pytest.fixture
def keras_home() -> Path:
    """The test run's Keras cache (weights under models/, datasets under datasets/)."""
    return _KERAS_HOME


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A local SQLite tracking store of the test's own (no server), set the way users set it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real `mlflow server` for the whole run: tests on it keep apart by `unique_name`."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real `prefect server start` for the whole run; yields its API URL."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as api:
        yield api


@pytest.fixture
def server_uri(tracking_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The shared tracking server's URL, set the way users set it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    return tracking_server


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A registered-model and experiment name of this test's own on the shared server."""
    return fresh_name(request.node.name)


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (a CI time-out, `kill`) ends the run as Ctrl-C does: the session's fixtures
    stop the servers they started instead of leaving them running."""
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(_RUN_DIR, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if any(MOBILENET_NO_TOP in str(report.longrepr) for report in skipped):
        terminalreporter.write_line(
            f"ImageNet weights missing: the end-to-end tests ran on a random base "
            f"(base.weights=null) and the tests of the pretrained path were skipped; set "
            f"TRANSFERFLOW_TEST_WEIGHTS_DIR to a folder holding {MOBILENET_NO_TOP}.",
            yellow=True,
            bold=True,
        )


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory: pytest.TempPathFactory):
    """Ten classes of Fashion-MNIST PNGs: 3 training, 1 validation and 2 test images each."""
    from tasks.data.demo import write_demo_dataset
    from tasks.data.table import load_image_table

    folder = tmp_path_factory.mktemp("tiny-images")
    write_demo_dataset(folder, train_per_class=3, val_per_class=1, test_per_class=2, seed=0)
    return load_image_table(folder / "manifest.csv", 0.1, 0.2, seed=0)
