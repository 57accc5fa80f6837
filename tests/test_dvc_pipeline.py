"""The pipeline as a DVC user runs it: `dvc repro`, then DVC's metrics, plots, status and git."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import HAVE_IMAGENET_WEIGHTS
from tests.repositories import DVC, ROOT, dvc_project, run, with_pipeline
from tests.test_training_flow import SHRUNK

pytestmark = pytest.mark.slow

# The shrunk default, naming every section the train stage lists as params: DVC reads them from
# the file the stage runs on, not from the file it `extends`.
CONFIG = {
    **SHRUNK,
    "seed": 42,
    "base": {"architecture": "MobileNet"} if HAVE_IMAGENET_WEIGHTS else {"weights": None},
    "head": {"dropout": 0.2},
    "evaluation": {"primary_metric": "accuracy"},
    "tracking": {"experiment": "dvc-test"},
}
TEST_IMAGES = 10 * SHRUNK["demo"]["test_per_class"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A team's repository with the pipeline, after `dvc repro train` as a user types it."""
    project = dvc_project(tmp_path_factory.mktemp("dvc-pipeline"), CONFIG)
    with_pipeline(project, "conf/test.yaml")
    # The stage calls `transferflow` from PATH; it runs this checkout's code.
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
    }
    run(DVC, "repro", "train", cwd=project, env=env)
    return project


def dvc_json(project: Path, *command: str):
    return json.loads(run(DVC, *command, "--json", cwd=project))


def test_dvc_sees_the_trained_stage_up_to_date(project: Path) -> None:
    assert dvc_json(project, "status", "train") == {}
    assert "Stage 'train' didn't change" in run(DVC, "repro", "train", "--dry", cwd=project)


def test_metrics_are_numbers_only(project: Path) -> None:
    shown = dvc_json(project, "metrics", "show")
    (workspace,) = shown.values()
    metrics = workspace["data"]["reports/metrics.json"]["data"]
    assert {"test_accuracy", "test_macro_f1", "test_loss", "train_seconds"} <= set(metrics)
    assert all(type(value) in (int, float) for value in metrics.values()), metrics
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["trainable_params"] > 0


def test_plots_show_the_training_curves_and_the_confusion_matrix(project: Path) -> None:
    plots = dvc_json(project, "plots", "show")["data"]
    assert {"loss", "accuracy", "confusion", "reports/confusion_matrix.png"} <= set(plots)
    loss_spec = json.dumps(plots["loss"])
    assert '"epoch"' in loss_spec and '"val_loss"' in loss_spec and "fine_tune_2" in loss_spec
    pairs = plots["confusion"][0]["content"]["data"]["values"]
    assert len(pairs) == TEST_IMAGES  # every test image counted once
    page = run(DVC, "plots", "show", cwd=project)
    assert (project / "dvc_plots" / "index.html").is_file(), page


def test_git_tracks_what_dvc_compares_across_commits(project: Path) -> None:
    run("git", "add", "-A", cwd=project)
    tracked = run("git", "ls-files", cwd=project).split()
    assert {
        "dvc.lock",
        "reports/metrics.json",
        "reports/training_curve.csv",
        "reports/confusion.csv",
        "reports/confusion_matrix.png",
    } <= set(tracked)
    assert not [path for path in tracked if path.startswith(("dvc_plots/", "mlartifacts/"))]
    run("git", "commit", "-qm", "run 1", cwd=project)
    # What `dvc exp show` and `dvc metrics diff` compare: each commit's own metrics, not `!`.
    diff = dvc_json(project, "metrics", "diff", "HEAD~1", "HEAD")["reports/metrics.json"]
    assert diff["test_accuracy"]["old"] is None
    assert isinstance(diff["test_accuracy"]["new"], float)
