"""Test-run environment: every service and cache in folders the test run owns, nothing downloaded."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

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
    """A tracking store of the test's own, set the way users set it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(_RUN_DIR, ignore_errors=True)
