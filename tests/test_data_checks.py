"""The data gate: planted leaks, copies, wrong labels, blank images and small classes are found,
and each policy does what it says; bad data gets one clear message."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conf.data import DataChecksConfig
from conf.registry import RegistryConfig
from tasks.data.checks import CHECKS, DataChecksError, apply_policy, find_problems, leaks_into_test
from tasks.data.label_issues import find_likely_label_errors
from tasks.data.pixels import summarize_pixels
from tasks.data.table import ImageTable, load_image_table

# The label check needs frozen features; these tests plant pixel faults and leave it off.
PIXEL_CHECKS = DataChecksConfig(label_issue="off")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """Fashion-MNIST's ten classes: 8 training, 2 validation and 6 test images each."""
    from tasks.data.demo import write_demo_dataset

    folder = tmp_path_factory.mktemp("clean") / "data"
    write_demo_dataset(folder, train_per_class=8, val_per_class=2, test_per_class=6, seed=0)
    return folder


def planted(clean: Path, tmp_path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A copy of the clean data with extra rows (path, label, split) in its manifest."""
    folder = tmp_path / "data"
    shutil.copytree(clean, folder)
    manifest = pd.read_csv(folder / "manifest.csv")
    extra = pd.DataFrame(rows, columns=["path", "label", "split"])
    pd.concat([manifest, extra], ignore_index=True).to_csv(folder / "manifest.csv", index=False)
    return folder


def resaved(folder: Path, source: str, name: str, factor: float) -> str:
    """`source` resized by `factor` and saved as a JPEG of quality 70 under `name`."""
    with Image.open(folder / source) as image:
        size = round(image.width * factor)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        image.resize((size, size), Image.Resampling.BILINEAR).save(folder / name, quality=70)
    return name


def with_copy(
    clean: Path, tmp_path: Path, source: tuple[str, str], copy: tuple[str, str, str]
) -> tuple[Path, pd.Series]:
    """The clean data plus a byte copy of the first image of `source` (split, label), added to
    the manifest as `copy` (path, label, split); the data folder and the source's row."""
    manifest = pd.read_csv(clean / "manifest.csv")
    row = first(manifest, *source)
    folder = planted(clean, tmp_path, [copy])
    shutil.copyfile(folder / row["path"], folder / copy[0])
    return folder, row


def first(manifest: pd.DataFrame, split: str, label: str | None = None) -> pd.Series:
    rows = manifest[manifest["split"] == split]
    if label is not None:
        rows = rows[rows["label"] == label]
    return rows.iloc[0]


def checked(folder: Path, settings: DataChecksConfig = PIXEL_CHECKS, min_test: int = 1):
    table = load_image_table(folder / "manifest.csv", 0.1, 0.2, seed=0)
    return checked_table(table, settings, min_test)


def checked_table(table: ImageTable, settings: DataChecksConfig, min_test: int = 1):
    pixels = summarize_pixels(table.frame["path"].tolist())
    findings = find_problems(table, pixels, None, settings, min_test, seed=0)
    return table, findings


def test_the_clean_cut_passes_untouched(clean: Path) -> None:
    table, findings = checked(clean)
    outcome = apply_policy(table, findings, PIXEL_CHECKS)
    assert outcome.decision == "pass"
    assert len(outcome.table.frame) == len(table.frame) == 160


def test_a_resaved_test_image_in_training_is_a_leak_that_stops_the_run(
    clean: Path, tmp_path: Path
) -> None:
    manifest = pd.read_csv(clean / "manifest.csv")
    source = first(manifest, "test", "coat")
    folder = planted(clean, tmp_path, [])
    copy = resaved(folder, source["path"], "images/extra/coat.jpg", 1.15)
    smaller = resaved(folder, first(manifest, "test", "bag")["path"], "images/extra/bag.jpg", 0.85)
    rows = [(copy, "coat", "train"), (smaller, "bag", "val")]
    planted_rows = pd.concat([manifest, pd.DataFrame(rows, columns=manifest.columns)])
    planted_rows.to_csv(folder / "manifest.csv", index=False)

    table, findings = checked(folder)
    outcome = apply_policy(table, findings, PIXEL_CHECKS)

    near = findings.flagged[findings.flagged["check"] == "near_duplicate"]
    flagged = set(near["path"].map(lambda p: Path(p).relative_to(folder).as_posix()))
    assert {copy, smaller, source["path"]} <= flagged
    assert leaks_into_test(near).sum() == 4  # both images of both pairs
    assert outcome.decision == "fail"
    assert outcome.failing == {"near_duplicate": 4}
    assert outcome.counts["test_leak"] == 2


def test_drop_removes_the_training_side_of_a_leak_and_keeps_the_test_image(
    clean: Path, tmp_path: Path
) -> None:
    folder, source = with_copy(
        clean, tmp_path, ("test", "sandal"), ("renamed.png", "sandal", "train")
    )
    settings = replace_policy(exact_duplicate="drop")

    table, findings = checked(folder, settings)
    outcome = apply_policy(table, findings, settings)

    assert outcome.decision == "drop"
    assert outcome.dropped["path"].tolist() == [str(folder / "renamed.png")]
    kept = set(outcome.table.frame["path"])
    assert str(folder / source["path"]) in kept and str(folder / "renamed.png") not in kept
    assert (outcome.table.frame["split"] == "test").sum() == (table.frame["split"] == "test").sum()


def test_copies_within_training_are_recorded_but_do_not_stop_the_run(
    clean: Path, tmp_path: Path
) -> None:
    folder, _ = with_copy(clean, tmp_path, ("train", "dress"), ("again.png", "dress", "train"))

    table, findings = checked(folder)
    outcome = apply_policy(table, findings, PIXEL_CHECKS)

    assert outcome.counts["exact_duplicate"] == 2
    assert outcome.counts["leak"] == 0
    assert outcome.decision == "pass"


def test_the_same_image_under_two_labels_is_dropped_from_training(
    clean: Path, tmp_path: Path
) -> None:
    copy = ("relabelled.png", "pullover", "train")
    folder, source = with_copy(clean, tmp_path, ("train", "shirt"), copy)

    table, findings = checked(folder)
    outcome = apply_policy(table, findings, PIXEL_CHECKS)

    conflicting = findings.flagged[findings.flagged["check"] == "conflicting_label"]
    assert len(conflicting) == 2
    assert "labelled 'pullover'" in " ".join(conflicting["detail"])
    assert set(outcome.dropped["path"]) == {
        str(folder / source["path"]),
        str(folder / "relabelled.png"),
    }


def test_a_blank_training_image_is_dropped(clean: Path, tmp_path: Path) -> None:
    folder = planted(clean, tmp_path, [("blank.png", "bag", "train")])
    Image.new("L", (28, 28), 0).save(folder / "blank.png")

    table, findings = checked(folder)
    outcome = apply_policy(table, findings, PIXEL_CHECKS)

    blank = findings.flagged[findings.flagged["check"] == "blank_image"]
    assert blank["path"].tolist() == [str(folder / "blank.png")]
    assert outcome.dropped["path"].tolist() == [str(folder / "blank.png")]


def test_a_class_too_small_for_the_gate_and_an_imbalance_are_flagged(clean: Path) -> None:
    table, findings = checked(clean, replace_policy(max_imbalance=1.0), min_test=10)
    balance = findings.flagged[findings.flagged["check"] == "class_balance"]
    assert len(balance) == 10  # every class has 6 test images, fewer than 10
    assert balance["detail"].str.contains("6 test image").all()
    table, findings = checked_table(skewed(table), replace_policy(max_imbalance=3.0))
    imbalance = findings.flagged[findings.flagged["check"] == "class_balance"]
    assert imbalance["detail"].str.startswith("imbalance 4.0").tolist() == [True]


def skewed(table: ImageTable) -> ImageTable:
    """`table` with 6 of the bag class's 8 training images left out."""
    frame = table.frame
    bags = frame[(frame["label"] == "bag") & (frame["split"] == "train")].index[:6]
    return replace(table, frame=frame.drop(bags).reset_index(drop=True))


def test_the_gate_needs_dozens_of_test_images_per_class_for_its_per_class_check() -> None:
    from tasks.stages.data_gate import per_class_test_minimum

    assert 40 <= per_class_test_minimum(RegistryConfig()) <= 70
    assert per_class_test_minimum(RegistryConfig(max_class_drop=0.2)) < 40
    assert per_class_test_minimum(RegistryConfig(gate="threshold", margin=0.0)) == 0


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("one image", "class(es) bag have a single image"),
        ("all copies", "all 12 images have the same pixels"),
        ("all blank", "all 12 images are blank"),
        ("a blank class", "every image of class(es) bag is blank"),
    ],
)
def test_unusable_data_gets_one_clear_message(tmp_path: Path, case: str, message: str) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for label in ("bag", "coat"):
        for index in range(6):
            split = "test" if index < 2 else "train"
            path = tmp_path / f"{label}{index}.png"
            pixels = rng.integers(0, 255, (20, 20), dtype=np.uint8)
            if case == "all copies":
                pixels = np.random.default_rng(1).integers(0, 255, (20, 20), dtype=np.uint8)
            if case == "all blank" or (case == "a blank class" and label == "bag"):
                pixels = np.full((20, 20), 30, np.uint8)
            Image.fromarray(pixels).save(path)
            rows.append((str(path), label, split))
    if case == "one image":
        rows = [row for row in rows if row[1] == "coat"] + [rows[0]]
        rows[-1] = (rows[-1][0], "bag", "train")
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(tmp_path / "m.csv", index=False)

    with pytest.raises(DataChecksError, match=message.replace("(", r"\(").replace(")", r"\)")):
        checked_file(tmp_path / "m.csv")


def checked_file(manifest: Path) -> None:
    table = load_image_table(manifest, 0.1, 0.2, seed=0)
    find_problems(table, summarize_pixels(table.frame["path"].tolist()), None, PIXEL_CHECKS, 1, 0)


def test_flipped_labels_are_found_with_the_label_they_should_have() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (5, 32)) * 3
    labels = np.repeat(np.arange(5), 200)
    features = centres[labels] + rng.normal(0, 1, (1000, 32))
    flipped = rng.choice(1000, 50, replace=False)
    given = labels.copy()
    given[flipped] = (labels[flipped] + 1 + rng.integers(0, 4, 50)) % 5

    found = find_likely_label_errors(features, given, 5, folds=5, seed=0)

    caught = np.isin(flipped, found.rows)
    assert caught.mean() >= 0.9
    assert np.isin(found.rows, flipped).mean() >= 0.9  # few clean images accused
    suggested = dict(zip(found.rows, found.suggested, strict=True))
    assert all(suggested[row] == labels[row] for row in flipped[caught])


def replace_policy(**changes) -> DataChecksConfig:
    return PIXEL_CHECKS.model_copy(update=changes)


# --- the real flows -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def leaky(tmp_path_factory, clean: Path) -> Path:
    """A project whose training split holds a re-saved copy of a test image, and a config that
    trains the smallest real pipeline (random MobileNet at 32 px, no fine-tuning)."""
    import yaml

    root = tmp_path_factory.mktemp("leaky") / "project"
    shutil.copytree(clean, root / "data")
    manifest = pd.read_csv(root / "data" / "manifest.csv")
    source = first(manifest, "test", "trouser")["path"]
    copy = resaved(root / "data", source, "images/leak/trouser.jpg", 1.15)
    extra = pd.DataFrame([(copy, "trouser", "train")], columns=manifest.columns)
    pd.concat([manifest, extra]).to_csv(root / "data" / "manifest.csv", index=False)
    tree = {
        "extends": str(Path(__file__).resolve().parents[1] / "conf" / "quick.yaml"),
        "data": {"path": "data/manifest.csv", "dvc_file": None, "image_size": 32, "batch_size": 16},
        "base": {"weights": None},
        "feature_extraction": {"epochs": 1},
        "fine_tune": {"stages": []},
        "registry": {"model_name": "leaky"},
        "tracking": {"experiment": "leaky"},
    }
    (root / "leaky.yaml").write_text(yaml.safe_dump(tree))
    return root


@pytest.mark.slow
def test_check_data_stops_on_the_leak_with_one_message_and_reuses_its_findings(
    leaky: Path,
) -> None:
    import json

    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["check-data", "-c", str(leaky / "leaky.yaml")])

    assert result.exit_code == 2, result.output
    report = leaky / "reports" / "data_checks"
    message = result.stderr.strip()
    assert message.startswith("Error: Data checks failed (2 near_duplicate;")
    assert f"Report: {report / 'summary.json'}" in message
    assert "Traceback" not in result.output
    flagged = pd.read_csv(report / "flagged.csv")
    assert list(flagged.columns) == ["path", "split", "check", "detail"]
    leak = flagged[flagged["check"] == "near_duplicate"]
    assert "images/leak/trouser.jpg" in set(leak["path"])  # relative to data.path's folder
    summary = json.loads((report / "summary.json").read_text())
    assert summary["decision"] == "fail" and summary["counts"]["test_leak"] == 1
    assert (report / "flagged.png").stat().st_size > 1000
    artifact = latest_artifact("data-checks")
    assert artifact.startswith("# Data checks: fail")
    assert "| images/leak/trouser.jpg | train | near_duplicate | leak: copy in test" in artifact

    again = CliRunner().invoke(app, ["check-data", "-c", str(leaky / "leaky.yaml")])
    assert again.exit_code == 2
    summary = json.loads((report / "summary.json").read_text())
    assert summary["reused"] is True and summary["seconds"] < 1.0


def latest_artifact(key: str) -> str:
    """The newest Prefect artifact under `key`, as its markdown."""
    import asyncio

    from prefect import get_client

    async def latest():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    return next(found.data for found in asyncio.run(latest()) if found.key == key)


@pytest.mark.slow
def test_training_stops_before_training_and_records_why_on_a_failed_run(
    leaky: Path, mlflow_uri: str
) -> None:
    from mlflow import MlflowClient

    from flows.train import train_classifier
    from tasks.data.checks import DataChecksFailedError

    with pytest.raises(DataChecksFailedError, match="nothing was trained or registered"):
        train_classifier(str(leaky / "leaky.yaml"), [])

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("leaky").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["data_checks"] == "fail"
    assert run.data.metrics["data_checks.test_leak"] == 1
    logged = {item.path for item in client.list_artifacts(run.info.run_id, "data_checks")}
    names = ("flagged.csv", "dropped.csv", "summary.json", "flagged.png")
    assert logged == {f"data_checks/{name}" for name in names}
    assert client.search_registered_models() == []
    stages = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert stages == []  # no stage trained


@pytest.mark.slow
def test_drop_trains_without_the_leaked_copy(leaky: Path, mlflow_uri: str, caplog) -> None:
    import logging

    from mlflow import MlflowClient

    from flows.train import train_classifier

    with caplog.at_level(logging.WARNING, logger="prefect"):
        result = train_classifier(str(leaky / "leaky.yaml"), ["data.checks.near_duplicate=drop"])

    client = MlflowClient(mlflow_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["data_checks"] == "drop"
    assert run.data.metrics["data_checks.dropped"] == 1
    # 80 training images in the clean cut, 81 with the copy: the copy was left out.
    assert "80 training" in run.data.tags["mlflow.note.content"]
    dropped = pd.read_csv(client.download_artifacts(run.info.run_id, "data_checks/dropped.csv"))
    assert dropped["path"].tolist() == ["images/leak/trouser.jpg"]
    assert dropped["detail"].iat[0].startswith("leak: copy in test")
    assert result.decision.promote
    # This config's base has random weights: it cannot fit the labels better than a random base.
    fit = run.data.metrics
    assert fit["domain_fit.pretrained"] < fit["domain_fit.random_init"] + 0.05
    assert any("fits these labels little better than a randomly" in m for m in caplog.messages)


def test_with_every_check_off_no_image_is_read(clean: Path) -> None:
    off = DataChecksConfig(**{check: "off" for check in CHECKS})
    table = load_image_table(clean / "manifest.csv", 0.1, 0.2, seed=0)
    findings = find_problems(table, None, None, off, min_test_per_class=1000, seed=0)
    assert findings.flagged.empty
    with pytest.raises(ValueError, match="pixel checks need"):
        find_problems(table, None, None, PIXEL_CHECKS, 1, 0)


def test_policies_read_from_yaml_as_written(tmp_path: Path) -> None:
    from conf import ConfigError, load_config

    config = tmp_path / "checks.yaml"
    config.write_text("data:\n  checks:\n    label_issue: off\n    blank_image: warn\n")
    checks = load_config(config).data.checks
    assert (checks.label_issue, checks.blank_image) == ("off", "warn")  # not YAML's false
    with pytest.raises(ConfigError, match=r"data\.checks\.class_balance"):
        load_config(config, ["data.checks.class_balance=drop"])  # a class cannot be dropped


def test_domain_fit_ranks_informative_features_above_noise_whatever_their_scale() -> None:
    from tasks.data.domain_fit import logme

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 100)
    informative = rng.normal(0, 1, (4, 16))[labels] + rng.normal(0, 1, (400, 16))
    noise = rng.normal(0, 1, (400, 16))
    constant = np.ones((400, 16))

    fit = logme(informative, labels, 4)
    assert fit > logme(noise, labels, 4) + 0.1 > logme(constant, labels, 4)
    assert logme(informative * 1000.0, labels, 4) == pytest.approx(fit)
    assert logme(informative[:, :8], labels, 4) < fit  # half the signal, less evidence
