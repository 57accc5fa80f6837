"""`transferflow serve` against real Prefect and MLflow servers: retrain only when the data moved.

A team's repository (`origin`) with data tracked by DVC and pushed to a local remote, and the
serving machine's checkout of it (`clone`, schedule.git_pull on). The deployment is triggered on
demand the way `prefect deployment run` does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import HAVE_IMAGENET_WEIGHTS
from tests.repositories import dvc_project, run
from tests.servers import BIN, ROOT, start, stop, tail

pytestmark = pytest.mark.slow

DEPLOYMENT = "retrain-classifier/test-retrain"
MODEL = "retrain-test"

# The real pipeline on a shrunk config: 32 px, a few images per class, two head epochs, no fine-tuning.
SHRUNK = {
    "extends": "default.yaml",
    "data": {"image_size": 32, "batch_size": 32},
    "feature_extraction": {"epochs": 4, "patience": 2},
    "fine_tune": {"stages": []},
    "registry": {"model_name": MODEL, "min_value": 0.0},
    "tracking": {"experiment": "retrain-test"},
    "demo": {"train_per_class": 4, "val_per_class": 2, "test_per_class": 3},
    "schedule": {"deployment_name": "test-retrain", "cron": "0 3 * * 1", "git_pull": True},
}


@dataclass(frozen=True)
class Servers:
    prefect_api: str
    mlflow_uri: str


@pytest.fixture(scope="module")
def servers(prefect_api: str, tracking_server: str) -> Iterator[Servers]:
    """The run's Prefect server and MLflow tracking server, on free loopback ports."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Prefect reads its settings once at import; this points this process's client at the server.
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        yield Servers(prefect_api=prefect_api, mlflow_uri=tracking_server)


@dataclass(frozen=True)
class Project:
    origin: Path  # where the team commits
    clone: Path  # the serving machine's checkout


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    """A git + DVC repository with its data pushed to a local remote, and a clone without data."""
    base = tmp_path_factory.mktemp("project")
    origin = dvc_project(base, SHRUNK)
    clone = base / "clone"
    run("git", "clone", "-q", str(origin), str(clone), cwd=base)
    return Project(origin=origin, clone=clone)


@dataclass(frozen=True)
class Served:
    """The `transferflow serve` process, its log, and what it was started with."""

    process: subprocess.Popen
    log: Path
    env: dict[str, str]
    arguments: list[str]


@pytest.fixture(scope="module")
def serving(servers: Servers, project: Project, tmp_path_factory) -> Iterator[Served]:
    """`transferflow serve` on the clone's config, as `make serve` runs it."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    arguments = [
        "-c",
        str(project.clone / "conf" / "test.yaml"),
        "-s",
        "feature_extraction.epochs=2",
    ]
    if not HAVE_IMAGENET_WEIGHTS:
        arguments += ["-s", "base.weights=null"]
    env = {
        **os.environ,
        "PREFECT_API_URL": servers.prefect_api,
        "PREFECT_HOME": str(log.parent / "prefect"),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "MLFLOW_TRACKING_URI": servers.mlflow_uri,
    }
    process = start([str(BIN / "transferflow"), "serve", *arguments], log, env)
    try:
        wait_for_deployment(process, log)
        yield Served(process, log, env, arguments)
    finally:
        stop(process)


def wait_for_deployment(process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"transferflow serve exited with {process.returncode}:\n{tail(log)}"
                )
            try:
                client.read_deployment_by_name(DEPLOYMENT)
                return
            except ObjectNotFound:
                time.sleep(1)
    raise TimeoutError(f"{DEPLOYMENT} was not served within {timeout} s:\n{tail(log)}")


@dataclass(frozen=True)
class Triggered:
    """One on-demand run of the deployment, as a user sees it in the Prefect UI."""

    state: str
    check: str  # the retraining-check artifact's markdown
    seconds: float


def trigger(serve_log: Path) -> Triggered:
    """`prefect deployment run` and wait, the Python way; returns the run's state and its note."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    started = time.monotonic()
    flow_run = run_deployment(DEPLOYMENT, timeout=420, poll_interval=1)
    seconds = time.monotonic() - started
    assert flow_run.state is not None and flow_run.state.is_completed(), (
        f"{flow_run.state}\n{tail(serve_log)}"
    )
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
    notes = [a.data for a in artifacts if a.key == "retraining-check"]
    assert len(notes) == 1, f"expected one retraining-check artifact, got {artifacts}"
    return Triggered(state=flow_run.state.name, check=str(notes[0]), seconds=seconds)


def pinned_md5(repo: Path) -> str:
    return yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]


def versions(uri: str) -> dict[str, dict[str, str]]:
    found = MlflowClient(uri).search_model_versions(f"name = '{MODEL}'")
    return {str(v.version): dict(v.tags) for v in found}


def run_count(uri: str) -> int:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(SHRUNK["tracking"]["experiment"])
    return 0 if experiment is None else len(client.search_runs([experiment.experiment_id]))


def add_images(repo: Path, per_class: int) -> None:
    """New labelled training images arrive: copies of existing ones under new names."""
    folder = repo / "data" / "fashion_mnist"
    manifest = pd.read_csv(folder / "manifest.csv")
    train = manifest[manifest["split"] == "train"].groupby("label").head(per_class)
    rows = []
    for row in train.itertuples():
        new = str(Path(row.path).with_name(f"new_{Path(row.path).name}"))
        shutil.copyfile(folder / row.path, folder / new)
        rows.append({"path": new, "label": row.label, "split": "train"})
    updated = pd.concat([manifest, pd.DataFrame(rows)], ignore_index=True)
    # Written beside and swapped in: DVC may have linked the old file from its cache.
    updated.to_csv(folder / "manifest.csv.new", index=False, lineterminator="\n")
    os.replace(folder / "manifest.csv.new", folder / "manifest.csv")


@pytest.fixture(scope="module")
def first(servers: Servers, serving: Served) -> Triggered:
    return trigger(serving.log)


def test_first_run_trains_registers_and_crowns_a_champion(
    servers: Servers, project: Project, first: Triggered
) -> None:
    assert "# Retraining check: retraining" in first.check
    assert "has no champion yet" in first.check
    registered = versions(servers.mlflow_uri)
    assert set(registered) == {"1"}
    assert registered["1"]["data_version"] == pinned_md5(project.origin)
    assert registered["1"]["promotion.decision"] == "promoted"
    client = MlflowClient(servers.mlflow_uri)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "1"
    # The scheduled run checked the data before training: its record is on the parent run.
    parent = client.get_run(client.get_run(champion.run_id).data.tags["mlflow.parentRunId"])
    assert parent.data.tags["data_checks"] == "pass"
    assert (project.clone / "data" / "fashion_mnist" / "manifest.csv").is_file()  # pulled by DVC


def test_second_run_with_unchanged_data_is_up_to_date(
    servers: Servers, serving: Served, first: Triggered
) -> None:
    runs_before = run_count(servers.mlflow_uri)
    second = trigger(serving.log)
    assert "# Retraining check: up to date" in second.check
    assert "champion v1" in second.check
    assert set(versions(servers.mlflow_uri)) == {"1"}
    assert run_count(servers.mlflow_uri) == runs_before
    assert second.seconds < first.seconds


def test_new_data_pushed_to_the_repository_retrains_and_registers(
    servers: Servers, project: Project, serving: Served, first: Triggered
) -> None:
    old_md5 = pinned_md5(project.origin)
    add_images(project.origin, per_class=2)
    run(str(BIN / "dvc"), "add", "-q", "data", cwd=project.origin)
    run(str(BIN / "dvc"), "push", "-q", cwd=project.origin)
    run("git", "commit", "-qam", "data v2: more shirts and sneakers", cwd=project.origin)
    new_md5 = pinned_md5(project.origin)
    assert new_md5 != old_md5

    third = trigger(serving.log)
    assert "# Retraining check: retraining" in third.check
    assert f"champion v1 was trained on {old_md5}, the data is now {new_md5}" in third.check
    assert "`git pull` moved" in third.check
    registered = versions(servers.mlflow_uri)
    assert set(registered) == {"1", "2"}
    assert registered["2"]["data_version"] == new_md5
    # Judged against v1 by the default gate; near chance on 3 test images a class, either
    # verdict can be right.
    assert registered["2"]["promotion.decision"] in {"promoted", "rejected"}
    assert registered["2"]["gate.mode"] == "non_inferiority"
    assert registered["2"]["promotion.champion_version"] == "1"
    challenger = MlflowClient(servers.mlflow_uri).get_model_version_by_alias(MODEL, "challenger")
    assert str(challenger.version) == "2"


def test_the_same_deployment_runs_on_a_process_work_pool(
    servers: Servers, serving: Served, first: Triggered, tmp_path: Path
) -> None:
    from prefect import get_client

    stop(serving.process)  # from here the pool's worker runs the deployment of the same name
    prefect = str(BIN / "prefect")
    run(prefect, "work-pool", "create", "test-pool", "--type", "process", cwd=ROOT, env=serving.env)
    deploy = [str(BIN / "transferflow"), "deploy", "--pool", "test-pool", *serving.arguments]
    said = run(*deploy, cwd=ROOT, env=serving.env)
    assert "prefect worker start --pool test-pool" in said
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
    assert deployment.work_pool_name == "test-pool"
    assert deployment.schedules[0].schedule.cron == SHRUNK["schedule"]["cron"]

    log = tmp_path / "worker.log"
    worker = start([prefect, "worker", "start", "--pool", "test-pool"], log, serving.env)
    try:
        registered = versions(servers.mlflow_uri)
        on_pool = trigger(log)
    finally:
        stop(worker)
    assert "# Retraining check: up to date" in on_pool.check
    assert versions(servers.mlflow_uri) == registered
