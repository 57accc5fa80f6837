"""Promotion with real registered Keras models: the load check and the paired gate end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import urlparse

import keras
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from conf import LoadedConfig, PipelineConfig
from tasks.data.table import load_image_table
from tasks.inference.evaluate import evaluate_on_images, score_predictions
from tasks.registry import held_out, promotion
from tasks.registry.held_out import version_predictions
from tasks.registry.promotion import load_problem, promote_if_better
from tasks.registry.versions import CHAMPION, ModelVersionRef, aliased_version
from tasks.tracking.runs import RunRef
from tests.serving_models import register_serving_model

pytestmark = pytest.mark.integration

CLASSES = ("dark", "light")
SIZE = 32


@pytest.fixture
def table(tmp_path: Path):
    """Dark and light images, 12 of each: any model that looks at brightness tells them apart."""
    rng = np.random.default_rng(0)
    for label, level in zip(CLASSES, (40, 210), strict=True):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(12):
            pixels = np.clip(rng.normal(level, 20, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{index}.png")
    return load_image_table(tmp_path / "images", val_fraction=0.0, test_fraction=0.5, seed=0)


def brightness_model(sign: float, threshold: float = 125.0) -> keras.Model:
    """Mean brightness decides: `sign` 1 says light for images brighter than `threshold`, -1
    the opposite."""
    pixels = keras.Input((SIZE, SIZE, 3))
    mean = keras.layers.GlobalAveragePooling2D()(pixels)
    logits = keras.layers.Dense(2, activation="softmax")(mean)
    model = keras.Model(pixels, logits)
    model.layers[-1].set_weights(
        [np.array([[-sign, sign]] * 3) / 30.0, np.array([sign, -sign]) * threshold / 10.0]
    )
    return model


def registered(uri: str, name: str, model: keras.Model, table) -> tuple[str, ModelVersionRef]:
    """Log, wrap for serving and register `model` in an experiment kept in the store's folder."""
    folder = Path(urlparse(uri).path).parent
    example = Path(table.split("test")["path"].iloc[0])
    return register_serving_model(uri, name, model, list(CLASSES), example, folder)


def loaded_config(tmp_path: Path, name: str, **registry) -> LoadedConfig:
    tree = {
        "data": {"image_size": SIZE, "batch_size": 8},
        "registry": {"model_name": name, "min_value": 0.0, **registry},
    }
    return LoadedConfig(PipelineConfig.model_validate(tree), tmp_path)


def promote_as_the_flows_do(run: RunRef, version, evaluation, table, loaded: LoadedConfig):
    """The promote-if-better step, on the sections of `loaded` the flows pass it."""
    config = loaded.config
    return promote_if_better.fn(
        run,
        version,
        evaluation,
        table,
        config.registry,
        config.evaluation.primary_metric,
        config.data.batch_size,
        config.seed,
    )


def paired(uri, challenger, score, table, loaded: LoadedConfig):
    config = loaded.config
    return promotion.paired_decider(
        uri,
        challenger,
        score,
        table,
        config.registry,
        config.evaluation.primary_metric,
        config.data.batch_size,
        config.seed,
    )


def promote(uri, run_id, version, table, loaded):
    predictions = version_predictions(uri, version, table, loaded.config.data.batch_size)
    evaluation = score_predictions(predictions.probabilities, predictions.labels, table.classes)
    experiment = MlflowClient(uri).get_run(run_id).info.experiment_id
    run = RunRef(run_id, experiment, uri)
    return promote_as_the_flows_do(run, version, evaluation, table, loaded)


def test_a_challenger_that_cannot_be_loaded_is_never_promoted(mlflow_uri, table, tmp_path) -> None:
    loaded = loaded_config(tmp_path, "load-check")
    run_id, version = registered(mlflow_uri, "load-check", brightness_model(1.0), table)
    assert load_problem(mlflow_uri, version, table) is None
    evaluation = score_predictions(np.tile([0.1, 0.9], (12, 1)), np.ones(12, dtype=int), CLASSES)
    # The model's files go missing from the artifact store after registration.
    stored = MlflowClient(mlflow_uri).get_model_version_download_uri("load-check", version.version)
    shutil.rmtree(urlparse(stored).path)

    experiment = MlflowClient(mlflow_uri).get_run(run_id).info.experiment_id
    run = RunRef(run_id, experiment, mlflow_uri)
    decision = promote_as_the_flows_do(run, version, evaluation, table, loaded)
    assert not decision.promote and "failed the load check" in decision.reason
    tags = MlflowClient(mlflow_uri).get_model_version("load-check", version.version).tags
    assert tags["promotion.decision"] == "rejected" and "load check" in tags["promotion.reason"]
    assert aliased_version(mlflow_uri, "load-check", CHAMPION) is None


@pytest.mark.parametrize(("mode", "promoted"), [("non_inferiority", True), ("superiority", False)])
def test_the_paired_gate_judges_an_equivalent_retrain_by_its_mode(
    mlflow_uri, table, tmp_path, mode, promoted
) -> None:
    name = f"paired-{mode}"
    loaded = loaded_config(tmp_path, name, gate=mode)
    first_run, first = registered(mlflow_uri, name, brightness_model(1.0), table)
    assert promote(mlflow_uri, first_run, first, table, loaded).promote  # no champion yet
    run_id, again = registered(mlflow_uri, name, brightness_model(1.0), table)

    decision = promote(mlflow_uri, run_id, again, table, loaded)
    assert decision.promote is promoted
    assert decision.report is not None and decision.report.images == 12
    assert decision.report.difference.estimate == 0.0
    client = MlflowClient(mlflow_uri)
    tags = client.get_model_version(name, again.version).tags
    assert tags["gate.mode"] == mode and tags["gate.images"] == "12"
    report = json.loads(Path(client.download_artifacts(run_id, "gate_report.json")).read_text())
    assert report["promote"] is promoted and len(report["classes"]) == 2
    champion = aliased_version(mlflow_uri, name, CHAMPION).version
    assert champion == (again.version if promoted else first.version)


def test_the_paired_gate_rejects_a_challenger_that_gets_a_class_wrong(
    mlflow_uri, table, tmp_path
) -> None:
    name = "paired-regression"
    loaded = loaded_config(tmp_path, name, gate="non_inferiority")
    first_run, first = registered(mlflow_uri, name, brightness_model(1.0), table)
    assert promote(mlflow_uri, first_run, first, table, loaded).promote
    run_id, flipped = registered(mlflow_uri, name, brightness_model(-1.0), table)

    decision = promote(mlflow_uri, run_id, flipped, table, loaded)
    assert not decision.promote
    assert sorted(decision.report.dropped_classes) == ["dark", "light"]
    assert aliased_version(mlflow_uri, name, CHAMPION).version == first.version


@pytest.fixture
def graded(tmp_path: Path):
    """2,000 images of even grey, all but 2 of each class in the test split: 1,000 dark (level
    60) and 1,000 light, of which 6 are at level 130 and 18 at level 140. A model that calls
    light above level t misses the light images below t, so its threshold sets exactly which
    test images it gets wrong."""
    folder = tmp_path / "graded"
    folder.mkdir()
    levels = {"dark": [60] * 1000, "light": [130] * 6 + [140] * 18 + [200] * 976}
    rows = []
    for label, values in levels.items():
        for index, level in enumerate(values):
            Image.new("RGB", (SIZE, SIZE), (level,) * 3).save(folder / f"{label}-{index}.png")
            rows.append(
                f"{label}-{index}.png,{label},{'train' if index >= len(values) - 2 else 'test'}"
            )
    (folder / "manifest.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return load_image_table(folder / "manifest.csv", val_fraction=0.0, test_fraction=0.0, seed=0)


def test_non_inferiority_serves_a_challenger_within_the_margin_and_not_one_past_it(
    mlflow_uri, graded, tmp_path
) -> None:
    """The champion gets every test image right. A challenger that misses 24 of the 1,996 is
    1.2 points worse: its interval lies below 0 and reaches past -0.01, so it is rejected (the
    rule before promoted it: the interval's upper end was within the margin). One that misses 6
    is 0.3 points worse: its interval lies below 0 too, but within the margin, so it is served."""
    name = "paired-margin"
    loaded = loaded_config(tmp_path, name, gate="non_inferiority", margin=0.01)
    first_run, first = registered(mlflow_uri, name, brightness_model(1.0, 100.0), graded)
    assert promote(mlflow_uri, first_run, first, graded, loaded).promote
    client = MlflowClient(mlflow_uri)

    worse_run, worse = registered(mlflow_uri, name, brightness_model(1.0, 150.0), graded)
    decision = promote(mlflow_uri, worse_run, worse, graded, loaded)
    interval = decision.report.difference
    assert interval.estimate == pytest.approx(-24 / 1996)
    assert interval.high < 0 and interval.low < -0.01 <= interval.high  # as in the issue
    assert not decision.promote
    assert "the data do not show it at most 0.01 worse than the champion" in decision.reason
    tags = client.get_model_version(name, worse.version).tags
    assert tags["promotion.decision"] == "rejected" and tags["gate.margin"] == "0.01"
    assert float(tags["gate.interval"].strip("[]").split(",")[0]) < -0.01
    assert aliased_version(mlflow_uri, name, CHAMPION).version == first.version

    close_run, close = registered(mlflow_uri, name, brightness_model(1.0, 135.0), graded)
    decision = promote(mlflow_uri, close_run, close, graded, loaded)
    interval = decision.report.difference
    assert interval.estimate == pytest.approx(-6 / 1996)
    assert interval.low >= -0.01 and interval.high < 0
    assert decision.promote
    assert "the data show it at most 0.01 worse than the champion" in decision.reason
    tags = client.get_model_version(name, close.version).tags
    assert tags["promotion.decision"] == "promoted"
    assert float(tags["gate.interval"].strip("[]").split(",")[0]) >= -0.01
    assert aliased_version(mlflow_uri, name, CHAMPION).version == close.version


def test_the_threshold_gate_rejects_an_equivalent_retrain_short_of_min_improvement(
    mlflow_uri, table, tmp_path
) -> None:
    name = "threshold"
    loaded = loaded_config(tmp_path, name, gate="threshold", min_improvement=0.05)
    first_run, first = registered(mlflow_uri, name, brightness_model(1.0), table)
    assert promote(mlflow_uri, first_run, first, table, loaded).promote
    run_id, again = registered(mlflow_uri, name, brightness_model(1.0), table)

    decision = promote(mlflow_uri, run_id, again, table, loaded)
    assert not decision.promote and decision.report is None
    assert "does not beat champion v1's 1.0000 by more than 0.0500" in decision.reason
    tags = MlflowClient(mlflow_uri).get_model_version(name, again.version).tags
    assert tags["promotion.decision"] == "rejected" and "gate.mode" not in tags
    assert aliased_version(mlflow_uri, name, CHAMPION).version == first.version


def test_the_paired_gate_scores_the_challenger_only_against_a_champion_and_once(
    mlflow_uri, table, tmp_path, monkeypatch
) -> None:
    name = "paired-lazy"
    loaded = loaded_config(tmp_path, name, gate="non_inferiority")
    _, first = registered(mlflow_uri, name, brightness_model(1.0), table)
    _, second = registered(mlflow_uri, name, brightness_model(1.0), table)
    scored: list[str] = []

    def counted(uri, version, table, batch_size):
        scored.append(version.version)
        return version_predictions(uri, version, table, batch_size)

    monkeypatch.setattr(promotion, "version_predictions", counted)
    assert paired(mlflow_uri, first, 1.0, table, loaded)(None).promote
    assert scored == []  # a first registration predicts nothing beyond the load check

    decide = paired(mlflow_uri, second, 1.0, table, loaded)
    assert decide(first).promote and decide(first).promote
    assert scored == ["1", "2", "1"]  # the champion each time, the challenger once


def test_the_gate_pairs_the_stages_scores_with_the_champions_stored_predictions(
    mlflow_uri, table, tmp_path, monkeypatch, caplog
) -> None:
    """A version runs over a test set once: its stage's scoring, or its first gate."""
    name = "paired-stored"
    loaded = loaded_config(tmp_path, name, gate="non_inferiority")
    first_run, first = registered(mlflow_uri, name, brightness_model(1.0), table)
    assert promote(mlflow_uri, first_run, first, table, loaded).promote
    loads: list[str] = []
    real_load = held_out.load_keras_model

    def counted(model_uri: str, uri: str):
        loads.append(model_uri)
        return real_load(model_uri, uri)

    monkeypatch.setattr(held_out, "load_keras_model", counted)
    model = brightness_model(1.0)
    run_id, second = registered(mlflow_uri, name, model, table)
    scored = evaluate_on_images.fn(model, table, loaded.config.data)  # as its final stage scores it
    experiment = MlflowClient(mlflow_uri).get_run(run_id).info.experiment_id
    run = RunRef(run_id, experiment, mlflow_uri)
    decision = promote_as_the_flows_do(run, second, scored, table, loaded)
    assert loads == []  # neither version ran over the test images again
    assert decision.promote and decision.report.images == 12
    assert decision.report.difference.estimate == 0.0
    client = MlflowClient(mlflow_uri)
    for version in (first, second):
        stored = held_out.predictions_artifact(version, table.split("test"))
        listed = client.list_artifacts(version.run_id, "gate_predictions")
        assert [item.path for item in listed] == [stored]

    # A damaged copy is noticed, recomputed and replaced; the decision does not change.
    stored = held_out.predictions_artifact(first, table.split("test"))
    damaged = tmp_path / stored.rsplit("/", 1)[1]
    damaged.write_bytes(b"not an npz file")
    client.log_artifact(first.run_id, str(damaged), "gate_predictions")
    again = paired(mlflow_uri, second, 1.0, table, loaded)(first)
    assert loads == [first.uri]
    assert "are unreadable" in caplog.text and "running the model over the test" in caplog.text
    assert again.promote and again.report.difference.estimate == 0.0
    loads.clear()
    paired(mlflow_uri, second, 1.0, table, loaded)(first)
    assert loads == []

    # Other contents under the same paths are other test images: nothing stored is read.
    changed = Path(table.split("test")["path"].iloc[0])
    Image.fromarray(np.full((SIZE, SIZE, 3), 200, np.uint8)).save(changed)
    assert held_out.predictions_artifact(first, table.split("test")) != stored
