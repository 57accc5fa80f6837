"""Bad input fails the real flow before any training, names the problem, and leaves MLflow alone."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from conf import ConfigError
from tasks.data.errors import DataNotFoundError
from tasks.data.table import EmptyDatasetError, UndecodableImagesError
from tasks.data.versioning import DvcPullError
from tasks.inference.features import CacheDirError
from tasks.model.bases import UnknownArchitectureError, WeightsNotFoundError
from tasks.model.blocks import UnfreezeTooDeepError
from tasks.runtime.tracking_server import TrackingServerUnreachableError
from tests.servers import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))


def image_folder(root: Path, classes=("boot", "shirt"), per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 255, (20, 20), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


def project(tmp_path: Path, images: Path, **sections) -> Path:
    """A project folder whose config trains on `images` without DVC, in its own MLflow store."""
    (tmp_path / ".git").mkdir(exist_ok=True)
    tree = {
        "extends": str(ROOT / "conf" / "quick.yaml"),
        "data": {"path": str(images), "dvc_file": None, "image_size": 32, "batch_size": 8},
        "base": {"weights": None},
        "registry": {"model_name": "bad-input"},
        "tracking": {"experiment": "bad-input"},
        **sections,
    }
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(tree))
    return config


def train(config: Path, *overrides: str):
    from flows.train import train_classifier

    return train_classifier(str(config), list(overrides))


def assert_nothing_tracked(project_dir: Path) -> None:
    """A run that failed on its input leaves no run, no model version, no champion."""
    uri = f"sqlite:///{project_dir / 'mlflow.db'}"
    if not (project_dir / "mlflow.db").exists():
        return
    client = MlflowClient(uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert client.search_registered_models() == []


def test_unknown_architecture_suggests_the_right_name(tmp_path: Path) -> None:
    config = project(
        tmp_path, image_folder(tmp_path / "images"), base={"architecture": "Mobilenet"}
    )
    with pytest.raises(UnknownArchitectureError, match="MobileNet"):
        train(config)
    assert_nothing_tracked(tmp_path)


def test_bad_config_value_names_the_key(tmp_path: Path) -> None:
    config = project(tmp_path, image_folder(tmp_path / "images"))
    with pytest.raises(ConfigError, match=r"head\.dropout"):
        train(config, "head.dropout=2")


def test_min_improvement_under_the_default_gate_is_one_message_with_the_fix(
    tmp_path: Path,
) -> None:
    """A threshold-gate setting left in a config after the default became non_inferiority."""
    from flows.cli import app

    config = project(tmp_path, image_folder(tmp_path / "images"))
    done = CliRunner().invoke(
        app, ["train", "-c", str(config), "-s", "registry.min_improvement=0.01"]
    )
    assert done.exit_code == 2, done.output
    (message,) = re.findall(r"^Error: .*", done.output, re.MULTILINE)
    assert message == f"Error: {config} is not a valid config:"
    assert "registry.min_improvement (0.01) applies to registry.gate: threshold only" in done.output
    assert "Set registry.gate: threshold to keep it, or remove min_improvement" in done.output
    assert "Traceback" not in done.output
    assert_nothing_tracked(tmp_path)


def test_missing_data_folder(tmp_path: Path) -> None:
    config = project(tmp_path, tmp_path / "no-such-folder")
    with pytest.raises(DataNotFoundError, match="no-such-folder"):
        train(config)
    assert_nothing_tracked(tmp_path)


def test_empty_data_folder_and_empty_class(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyDatasetError):
        train(project(tmp_path, tmp_path / "empty"))
    data = image_folder(tmp_path / "images")
    (data / "sandal").mkdir()
    with pytest.raises(EmptyDatasetError, match="sandal"):
        train(project(tmp_path, data))
    assert_nothing_tracked(tmp_path)


def test_every_undecodable_image_is_named(tmp_path: Path) -> None:
    data = image_folder(tmp_path / "images")
    (data / "boot" / "notes.png").write_text("not an image")
    (data / "shirt" / "cut.png").write_bytes((data / "shirt" / "0.png").read_bytes()[:40])
    with pytest.raises(UndecodableImagesError) as error:
        train(project(tmp_path, data))
    assert "notes.png" in str(error.value) and "cut.png" in str(error.value)
    assert_nothing_tracked(tmp_path)


def test_missing_weights_file_says_where_it_looked_before_the_data_is_read(
    tmp_path: Path,
) -> None:
    """The data folder is missing too: the weights file is checked first."""
    missing = tmp_path / "weights" / "mobilenet.h5"
    config = project(tmp_path, tmp_path / "no-such-folder", base={"weights": str(missing)})
    with pytest.raises(WeightsNotFoundError, match=rf"base\.weights.*{missing}"):
        train(config)
    assert_nothing_tracked(tmp_path)


def test_unfreezing_more_blocks_than_the_base_has_fails_before_the_data_is_read(
    tmp_path: Path,
) -> None:
    config = project(
        tmp_path,
        tmp_path / "no-such-folder",
        fine_tune={"stages": [{"unfreeze_blocks": 2, "epochs": 1}, {"unfreeze_blocks": 99}]},
    )
    with pytest.raises(UnfreezeTooDeepError) as error:
        train(config)
    message = str(error.value)
    assert "fine_tune.stages[1].unfreeze_blocks is 99" in message
    assert "MobileNet has 14 blocks" in message
    assert_nothing_tracked(tmp_path)


def test_an_unwritable_cache_dir_fails_before_the_data_is_read(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # a folder under a file fails for root too
    config = project(
        tmp_path, tmp_path / "no-such-folder", feature_extraction={"cache_dir": str(blocker / "f")}
    )
    with pytest.raises(CacheDirError, match=r"feature_extraction\.cache_dir"):
        train(config)
    assert_nothing_tracked(tmp_path)


def test_unknown_primary_metric_names_the_key(tmp_path: Path) -> None:
    config = project(tmp_path, tmp_path / "no-such-folder")
    with pytest.raises(ConfigError, match=r"evaluation\.primary_metric.*'accuracy' or 'macro_f1'"):
        train(config, "evaluation.primary_metric=top5")


def test_imagenet_weights_not_cached_offline_say_how_to_stage(tmp_path: Path) -> None:
    config = project(
        tmp_path,
        image_folder(tmp_path / "images"),
        base={"architecture": "MobileNetV2", "weights": "imagenet", "options": {"alpha": 0.35}},
    )
    with pytest.raises(WeightsNotFoundError) as error:
        train(config)
    assert "models" in str(error.value) and ".h5" in str(error.value)
    assert_nothing_tracked(tmp_path)


def test_unreachable_dvc_remote_is_named(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    data = image_folder(repo / "data" / "images")
    for command in (
        ["git", "init", "-q"],
        [DVC, "init", "-q"],
        [DVC, "remote", "add", "-d", "storage", str(tmp_path / "gone")],
        [DVC, "add", "-q", "data"],
    ):
        subprocess.run(command, cwd=repo, check=True, capture_output=True)
    # Data only in the local cache, never pushed, and the remote folder does not exist.
    subprocess.run(["rm", "-rf", str(data), str(repo / ".dvc" / "cache")], check=True)
    config = project(
        repo, data, data={"path": "data/images", "dvc_file": "data.dvc", "image_size": 32}
    )
    with pytest.raises(DvcPullError, match="storage"):
        train(config)
    assert_nothing_tracked(repo)


def test_tracking_server_that_is_down_is_named_before_the_data_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data folder is missing too: the server is checked first, before any data work."""
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    config = project(tmp_path, tmp_path / "no-such-folder")
    with pytest.raises(TrackingServerUnreachableError, match=f"127.0.0.1:{port}"):
        train(config)
