"""What a user finds in MLflow's UI after a pipeline run: who ran it and from which commit, what
each run is, one training curve across stages, models named by stage with their final scores,
per-class scores grouped, every stage's data, and a link that opens the training view.

Two stages are logged with the real tracking functions into a SQLite store, with tiny Keras
models; the real training flow checks the same on its own runs (tests/test_training_flow.py).
"""

from __future__ import annotations

import getpass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from tasks.inference.evaluate import score_predictions
from tasks.registry.versions import MODEL_DESCRIPTION, register_challenger
from tasks.runtime.tracking_server import ui_hint, using_tracking_uri
from tasks.tracking.runs import (
    ensure_experiment,
    finish_run,
    git_commit,
    source_tags,
    start_pipeline_run,
)
from tasks.tracking.stage_runs import PER_CLASS_TABLE, log_stage, stage_description
from tests.repositories import run

CLASSES = ("boot", "shirt", "bag")
DATA_VERSION = "0123456789abcdef0123456789abcdef"
SPLITS = {"train": 6, "val": 3, "test": 3}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A git project whose pipeline run has a trained head and a fine-tuning stage after it."""
    import keras

    from tasks.tracking.history import TrainingHistory

    project = tmp_path_factory.mktemp("project")
    (project / "params.yaml").write_text("seed: 1\n")
    run("git", "init", "-q", "-b", "main", cwd=project)
    run("git", "-c", "user.email=t@example.com", "-c", "user.name=t", "add", "-A", cwd=project)
    run(
        "git",
        "-c",
        "user.email=t@example.com",
        "-c",
        "user.name=t",
        "commit",
        "-qm",
        "v1",
        cwd=project,
    )
    uri = f"sqlite:///{project / 'mlflow.db'}"
    experiment = ensure_experiment(uri, "ui", project)
    table = pd.DataFrame(
        [
            (f"data/{split}/{index}.png", CLASSES[index % 3], split)
            for split, count in SPLITS.items()
            for index in range(count)
        ],
        columns=["path", "label", "split"],
    )
    parent = start_pipeline_run(
        uri,
        experiment,
        run_name="pipeline",
        params={"seed": "1"},
        tags=source_tags(project),
        dataset=table,
        dataset_source=str(project / "data"),
        data_version=DATA_VERSION,
        heartbeat_seconds=60,
        description="MobileNet fine-tuned in stages on fashion_mnist",
    )
    splits = {split: table[table["split"] == split] for split in SPLITS}
    labels = np.array([0, 1, 2])
    model = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(3)]
    )
    example = np.zeros((1, 4, 4, 3), np.float32)
    stages = {}
    first_step = 0
    for stage, epochs, best, right in (("feature_extraction", 3, 1, 2), ("fine_tune_1", 2, 1, 3)):
        history = TrainingHistory(
            epochs={
                "loss": tuple(1.0 - 0.1 * e for e in range(epochs)),
                "val_loss": tuple(1.0 - 0.1 * e for e in range(epochs)),
            },
            best_epoch=best,
            seconds=1.0,
            trainable_params=100,
            learning_rate=1e-3,
        )
        predicted = np.eye(3)[[0, 1, 2][:right] + [0] * (3 - right)]
        evaluation = score_predictions(predicted * 0.9 + 0.03, labels, CLASSES)
        stages[stage] = log_stage(
            parent,
            stage,
            params={"epochs": str(epochs)},
            history=history,
            evaluation=evaluation,
            description=stage_description(f"{stage} trains.", history, evaluation, first_step),
            first_step=first_step,
            splits=splits,
            model=model,
            signature_example=example,
            pip_requirements=["keras"],
        )
        first_step += epochs
    finish_run(parent)
    return project, uri, parent, stages


def test_every_run_says_who_started_it_from_which_source_and_commit(logged) -> None:
    project, uri, parent, stages = logged
    client = MlflowClient(uri)
    commit = git_commit(project)
    assert len(commit) == 40
    for run_id in (parent.run_id, *(record.run_id for record in stages.values())):
        tags = client.get_run(run_id).data.tags
        assert tags["mlflow.user"] == getpass.getuser()
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags[
            "mlflow.source.name"
        ]  # the script that ran: pytest here, transferflow for users
        assert tags["mlflow.source.git.commit"] == commit


def test_source_tags_leave_out_the_commit_outside_a_git_checkout(tmp_path) -> None:
    tags = source_tags(tmp_path)
    assert tags["mlflow.user"] == getpass.getuser()
    assert "mlflow.source.git.commit" not in tags


def test_runs_describe_themselves(logged) -> None:
    _, uri, parent, stages = logged
    client = MlflowClient(uri)
    assert "fashion_mnist" in client.get_run(parent.run_id).data.tags["mlflow.note.content"]
    note = client.get_run(stages["fine_tune_1"].run_id).data.tags["mlflow.note.content"]
    assert note.startswith("fine_tune_1 trains. 2 epochs (steps 3-4 of the pipeline's curves)")
    assert "Test accuracy 1.0000" in note


def test_fine_tuning_continues_the_heads_curve(logged) -> None:
    _, uri, _, stages = logged
    client = MlflowClient(uri)
    steps = {
        stage: [m.step for m in client.get_metric_history(record.run_id, "val_loss")]
        for stage, record in stages.items()
    }
    assert steps == {"feature_extraction": [0, 1, 2], "fine_tune_1": [3, 4]}
    # The test scores sit at the stage's last step.
    (score,) = client.get_metric_history(stages["fine_tune_1"].run_id, "test_accuracy")
    assert score.step == 4


def test_each_stage_model_is_named_after_its_stage_and_carries_its_final_scores(logged) -> None:
    _, uri, _, stages = logged
    client = MlflowClient(uri)
    for stage, record in stages.items():
        model = client.get_logged_model(record.model_uri.removeprefix("models:/"))
        assert model.name == stage
        assert model.tags["mlflow.note.content"].startswith(f"{stage} trains.")
        metrics = {m.key: m for m in model.metrics}
        run_metrics = client.get_run(record.run_id).data.metrics
        assert metrics["test_accuracy"].value == run_metrics["test_accuracy"]
        assert metrics["test_accuracy"].dataset_name == "data/test"
        assert metrics["test_accuracy"].dataset_digest == DATA_VERSION
        assert metrics["test_recall/shirt"].value == run_metrics["test_recall/shirt"]
        # The epoch whose weights early stopping kept (best_epoch 1), not epoch 0.
        assert metrics["val_loss"].value == pytest.approx(0.9)
        assert metrics["val_loss"].dataset_name == "data/val"
    first_step_of_fine_tuning = 3
    (kept,) = [
        m
        for m in client.get_logged_model(
            stages["fine_tune_1"].model_uri.removeprefix("models:/")
        ).metrics
        if m.key == "val_loss"
    ]
    assert kept.step == first_step_of_fine_tuning + 1


def test_per_class_scores_are_grouped_and_tabled(logged) -> None:
    _, uri, _, stages = logged
    client = MlflowClient(uri)
    record = stages["feature_extraction"]
    metrics = client.get_run(record.run_id).data.metrics
    per_class = {name for name in metrics if "/" in name}
    assert per_class == {
        f"test_{kind}/{name}" for kind in ("precision", "recall") for name in CLASSES
    }
    assert not any(name.startswith(("test_recall_", "test_precision_")) for name in metrics)
    with using_tracking_uri(uri):  # load_table searches runs through the fluent API
        table = client.load_table(
            client.get_run(record.run_id).info.experiment_id,
            PER_CLASS_TABLE,
            run_ids=[record.run_id],
        )
    assert table["class"].tolist() == list(CLASSES)
    assert table["recall"].tolist() == pytest.approx([metrics[f"test_recall/{c}"] for c in CLASSES])


def test_every_stage_run_names_its_training_validation_and_test_data(logged) -> None:
    _, uri, parent, stages = logged
    client = MlflowClient(uri)
    (whole,) = client.get_run(parent.run_id).inputs.dataset_inputs
    assert whole.dataset.digest == DATA_VERSION
    for record in stages.values():
        inputs = client.get_run(record.run_id).inputs.dataset_inputs
        found = {
            given.tags[0].value: (given.dataset.name, given.dataset.digest, given.dataset.source)
            for given in inputs
        }
        assert found == {
            context: (f"data/{split}", DATA_VERSION, whole.dataset.source)
            for context, split in (("training", "train"), ("validation", "val"), ("test", "test"))
        }


def test_registered_model_and_version_have_descriptions(logged) -> None:
    _, uri, parent, stages = logged
    client = MlflowClient(uri)
    final = stages["fine_tune_1"]
    version = register_challenger(
        uri, final.model_uri, "described", parent.run_id, {}, description="the fine_tune_1 model"
    )
    assert client.get_model_version("described", version.version).description == (
        "the fine_tune_1 model"
    )
    assert client.get_registered_model("described").description == MODEL_DESCRIPTION
    # A description written by hand in the UI stays.
    client.update_registered_model("described", description="ours")
    register_challenger(uri, final.model_uri, "described", parent.run_id, {}, description="again")
    assert client.get_registered_model("described").description == "ours"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (
            "http://alice:secret@mlflow.example:5000/",
            "open http://mlflow.example:5000/#/experiments/7?workflowType=machine_learning",
        ),
        (
            "sqlite:////p/mlflow.db",
            "mlflow ui --backend-store-uri sqlite:////p/mlflow.db --default-artifact-root "
            "/p/mlartifacts --host 127.0.0.1 --port 5000, then open "
            "http://127.0.0.1:5000/#/experiments/7?workflowType=machine_learning",
        ),
    ],
)
def test_ui_link_opens_the_experiment_in_the_training_view(uri: str, expected: str) -> None:
    assert ui_hint(uri, Path("/p"), "7") == expected
