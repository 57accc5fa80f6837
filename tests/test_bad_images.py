"""`data.on_bad_images`: undecodable files fail the real flow by name, or are skipped and listed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from conf import ConfigError, load_config
from tasks.data.table import UndecodableImagesError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BAD = ("data/images/boot/notes.png", "data/images/shirt/cut.png", "data/images/shirt/empty.jpg")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC project whose data/images holds two classes and three undecodable files.

    The config trains the smallest real pipeline: random MobileNet at 32 px, one head epoch,
    no fine-tuning.
    """
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("bad-images") / "project"
    images = root / "data" / "images"
    rng = np.random.default_rng(0)
    for name in ("boot", "shirt"):
        (images / name).mkdir(parents=True)
        for index in range(6):
            pixels = rng.integers(0, 255, (20, 20), dtype=np.uint8)
            Image.fromarray(pixels).save(images / name / f"{index}.png")
    (root / BAD[0]).write_text("not an image")
    (root / BAD[1]).write_bytes((images / "shirt" / "0.png").read_bytes()[:40])
    (root / BAD[2]).write_bytes(b"")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / "remote").mkdir()
    with contextlib.chdir(root), Repo.init(".") as repo:
        repo.add(["data"])
        with repo.config.edit() as config:
            config["remote"]["storage"] = {"url": os.fspath(root / "remote")}
            config["core"]["remote"] = "storage"
        repo.push()
    tree = {
        "extends": str(ROOT / "conf" / "quick.yaml"),
        "data": {"path": "data/images", "dvc_file": "data.dvc", "image_size": 32, "batch_size": 8},
        "base": {"weights": None},
        "feature_extraction": {"epochs": 1},
        "fine_tune": {"stages": []},
        "registry": {"model_name": "bad-images"},
        "tracking": {"experiment": "bad-images"},
    }
    (root / "bad.yaml").write_text(yaml.safe_dump(tree))
    return root


def pinned_md5(project: Path) -> str:
    return yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]


def test_on_bad_images_accepts_fail_and_skip_only(project: Path) -> None:
    assert load_config(project / "bad.yaml").data.on_bad_images == "fail"
    skip = load_config(project / "bad.yaml", ["data.on_bad_images=skip"])
    assert skip.data.on_bad_images == "skip"
    with pytest.raises(ConfigError, match=r"data\.on_bad_images"):
        load_config(project / "bad.yaml", ["data.on_bad_images=ignore"])


def test_fail_names_every_undecodable_file_and_tracks_nothing(project: Path, mlflow_uri) -> None:
    from flows.train import train_classifier

    with pytest.raises(UndecodableImagesError) as caught:
        train_classifier(str(project / "bad.yaml"), [])
    assert all(str(project / path) in str(caught.value) for path in BAD)
    client = MlflowClient(mlflow_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_skip_trains_without_them_and_lists_them_on_the_run(
    project: Path, mlflow_uri, tmp_path: Path
) -> None:
    from flows.cli import app

    result = CliRunner().invoke(
        app, ["train", "-c", str(project / "bad.yaml"), "-s", "data.on_bad_images=skip"]
    )

    assert result.exit_code == 0, result.output
    assert (
        "Skipped:      3 undecodable images (listed in skipped_images.csv on the run)"
        in result.stdout
    )
    run_id = re.search(r"MLflow run:\s+(\w+)", result.stdout).group(1)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["skipped_images"] == "3"
    assert run.data.tags["data_version"] == pinned_md5(project)  # the pinned version, not re-hashed
    listed = pd.read_csv(client.download_artifacts(run_id, "skipped_images.csv", str(tmp_path)))
    assert list(listed.columns) == ["path", "problem"]
    assert sorted(listed["path"]) == sorted(BAD)
    assert listed["problem"].str.len().min() > 0
    dataset = run.inputs.dataset_inputs[0].dataset
    assert dataset.digest == pinned_md5(project)[:36]
    assert "Skipped 3 undecodable image file(s)" in training_summary()


def training_summary() -> str:
    from prefect import get_client

    async def latest():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    return next(a.data for a in asyncio.run(latest()) if a.key == "training-summary")
