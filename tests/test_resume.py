"""Resume after a crash: `kill -9` of `transferflow train` mid-stage, then the same command again."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import HAVE_IMAGENET_WEIGHTS
from tests.repositories import dvc_project
from tests.servers import BIN, tail

pytestmark = pytest.mark.slow

# Three stages; the second is long enough (epochs) to be killed in the middle of.
SHRUNK = {
    "extends": "default.yaml",
    "data": {"image_size": 64, "batch_size": 16},
    "feature_extraction": {"epochs": 4, "patience": 2},
    "fine_tune": {
        "patience": 50,
        "stages": [{"unfreeze_blocks": 2, "epochs": 40}, {"unfreeze_blocks": 3, "epochs": 1}],
    },
    "registry": {"model_name": "resume-test", "min_value": 0.0},
    "tracking": {"experiment": "resume-test"},
    "demo": {"train_per_class": 8, "val_per_class": 2, "test_per_class": 3},
}


def train_command(project: Path) -> list[str]:
    command = [str(BIN / "transferflow"), "train", "-c", str(project / "conf" / "test.yaml")]
    if not HAVE_IMAGENET_WEIGHTS:
        command += ["-s", "base.weights=null"]
    return command


def stage_runs(client: MlflowClient, parent_id: str) -> dict:
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    return {child.data.tags["stage"]: child for child in children}


def parent_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("resume-test")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], "tags.strategy = 'fine_tune'")
    return sorted(runs, key=lambda run: run.info.start_time)


def test_a_killed_run_resumes_from_its_last_finished_stage(tmp_path, prefect_api) -> None:
    project = dvc_project(tmp_path, SHRUNK)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own mlflow.db, as a user has it
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    log = tmp_path / "first.log"

    with log.open("wb") as out:
        first = subprocess.Popen(
            train_command(project), cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            # Kill as soon as feature extraction is checkpointed: fine_tune_1 (40 epochs) is
            # then under way.
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and first.poll() is None:
                runs = (project / "mlflow.db").exists() and parent_runs(client)
                stages = stage_runs(client, runs[0].info.run_id) if runs else {}
                head = stages.get("feature_extraction")
                if head is not None and head.data.tags.get("checkpoint") == "saved":
                    break
                time.sleep(0.3)
            assert first.poll() is None, f"the first run ended before it was killed:\n{tail(log)}"
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        finally:
            if first.poll() is None:
                first.kill()
    (killed,) = parent_runs(client)
    assert set(stage_runs(client, killed.info.run_id)) <= {"feature_extraction", "fine_tune_1"}
    head_run = stage_runs(client, killed.info.run_id)["feature_extraction"]

    again = subprocess.run(
        train_command(project), cwd=project, env=env, capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"Resumed:      feature_extraction from run {head_run.info.run_id}" in again.stdout

    resumed = parent_runs(client)[-1]
    assert resumed.info.run_id != killed.info.run_id and resumed.info.status == "FINISHED"
    stages = stage_runs(client, resumed.info.run_id)
    assert set(stages) == {"feature_extraction", "fine_tune_1", "fine_tune_2"}
    head = stages["feature_extraction"]
    assert head.data.tags["resumed_from_run_id"] == head_run.info.run_id
    assert head.data.metrics["test_accuracy"] == head_run.data.metrics["test_accuracy"]
    assert head.data.tags["lineage_key"] == head_run.data.tags["lineage_key"]
    for trained in ("fine_tune_1", "fine_tune_2"):
        assert "resumed_from_run_id" not in stages[trained].data.tags
        assert stages[trained].data.tags["checkpoint"] == "saved"
    # Nothing was trained a second time: exactly one run trained each stage.
    experiment = resumed.info.experiment_id
    trained_heads = client.search_runs(
        [experiment], "tags.stage = 'feature_extraction' and tags.checkpoint = 'saved'"
    )
    assert len(trained_heads) == 1
