"""The retraining check: when a scheduled run trains, when it says up to date, and its errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from conf import ConfigError, LoadedConfig, load_config
from tasks.registry.freshness import (
    GitPullError,
    ProjectUpdate,
    decide_retraining,
    decision_markdown,
    git_pull,
    training_data_version,
)
from tasks.registry.versions import ModelVersionRef

CONF = Path(__file__).resolve().parents[1] / "conf"
DATA = "0123abcd.dir"
CONFIG = "f" * 64


def version(number: str, data: str = DATA, config: str = CONFIG, **tags: str) -> ModelVersionRef:
    return ModelVersionRef(
        "clf", number, "run", {"data_version": data, "config_sha256": config, **tags}
    )


def test_champion_trained_on_the_same_data_and_config_is_up_to_date() -> None:
    champion = version("3")
    decision = decide_retraining("clf", DATA, CONFIG, champion, champion)
    assert not decision.retrain
    assert decision.reason.startswith("up to date: champion v3")
    assert decision.champion_version == "3"


def test_no_champion_retrains() -> None:
    decision = decide_retraining("clf", DATA, CONFIG, None, None)
    assert decision.retrain and "no champion yet" in decision.reason


def test_new_data_version_retrains_and_names_both_versions() -> None:
    decision = decide_retraining("clf", "99999999.dir", CONFIG, version("1"), version("1"))
    assert decision.retrain
    assert f"champion v1 was trained on {DATA}" in decision.reason
    assert "99999999.dir" in decision.reason
    assert "config" not in decision.reason


def test_changed_config_retrains() -> None:
    decision = decide_retraining("clf", DATA, "e" * 64, version("1"), version("1"))
    assert decision.retrain
    assert decision.reason == f"training config changed: sha256 {'f' * 12} -> {'e' * 12}"


def test_rejected_challenger_on_the_same_inputs_is_not_retrained_every_week() -> None:
    rejected = version("2", data="new.dir", **{"promotion.decision": "rejected"})
    decision = decide_retraining("clf", "new.dir", CONFIG, version("1"), rejected)
    assert not decision.retrain
    assert "challenger v2" in decision.reason and "rejected" in decision.reason


def test_challenger_without_a_decision_is_retrained() -> None:
    unfinished = version("2", data="new.dir")  # the run stopped before the gate decided
    decision = decide_retraining("clf", "new.dir", CONFIG, version("1"), unfinished)
    assert decision.retrain and "data changed" in decision.reason


def test_missing_data_version_retrains_so_training_reports_it() -> None:
    assert decide_retraining("clf", None, CONFIG, version("1"), version("1")).retrain


def test_markdown_says_up_to_date_and_where_git_moved() -> None:
    decision = decide_retraining("clf", DATA, CONFIG, version("1"), None)
    text = decision_markdown(decision, ProjectUpdate(before="a" * 40, after="b" * 40))
    assert text.startswith("# Retraining check: up to date")
    assert "aaaaaaaaaa -> bbbbbbbbbb" in text
    assert DATA in text


def test_training_data_version_reads_the_pin_without_pulling(tmp_path: Path) -> None:
    (tmp_path / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": DATA, "path": "data"}]}))
    loaded = LoadedConfig(load_config(CONF / "default.yaml"), tmp_path)
    assert training_data_version(loaded.config.data, loaded.project) == DATA
    (tmp_path / "data.dvc").unlink()
    assert training_data_version(loaded.config.data, loaded.project) is None


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("schedule.cron=61 3 * * 1", "schedule.cron"),
        ("schedule.cron=every monday", "schedule.cron"),
        ("schedule.timezone=Mars/Olympus", "schedule.timezone"),
        ("schedule.deployment_name=", "schedule.deployment_name"),
        ("schedule.gitpull=true", "schedule.gitpull"),
    ],
)
def test_bad_schedule_is_named(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(CONF / "default.yaml", [override])
    assert named in str(error.value)


def test_moving_the_schedule_or_the_gate_does_not_make_the_next_run_retrain() -> None:
    from tasks.registry.versions import config_fingerprint

    def fingerprint(*overrides: str) -> str:
        return config_fingerprint(load_config(CONF / "default.yaml", list(overrides)))

    unchanged = fingerprint()
    assert fingerprint("schedule.cron=0 4 * * *", "schedule.git_pull=true") == unchanged
    # Champions registered under the old default gate are not stale under the new one.
    assert fingerprint("registry.gate=threshold") == unchanged
    assert fingerprint("head.dropout=0.3") != unchanged


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def origin_and_clone(tmp_path: Path) -> tuple[Path, Path]:
    origin = tmp_path / "origin"
    origin.mkdir()
    git("init", "-q", "-b", "main", cwd=origin)
    git("config", "user.email", "t@example.com", cwd=origin)
    git("config", "user.name", "test", cwd=origin)
    (origin / "data.dvc").write_text("v1\n")
    git("add", "-A", cwd=origin)
    git("commit", "-qm", "v1", cwd=origin)
    git("clone", "-q", str(origin), str(tmp_path / "clone"), cwd=tmp_path)
    return origin, tmp_path / "clone"


def test_git_pull_brings_the_new_commit(origin_and_clone: tuple[Path, Path]) -> None:
    origin, clone = origin_and_clone
    assert not git_pull(clone).changed
    (origin / "data.dvc").write_text("v2\n")
    git("commit", "-qam", "v2", cwd=origin)
    update = git_pull(clone)
    assert update.changed and update.after == git("rev-parse", "HEAD", cwd=origin)
    assert (clone / "data.dvc").read_text() == "v2\n"


def test_git_pull_that_cannot_fast_forward_says_how_to_fix_it(
    origin_and_clone: tuple[Path, Path],
) -> None:
    origin, clone = origin_and_clone
    (origin / "data.dvc").write_text("theirs\n")
    git("commit", "-qam", "theirs", cwd=origin)
    git("config", "user.email", "t@example.com", cwd=clone)
    git("config", "user.name", "test", cwd=clone)
    (clone / "data.dvc").write_text("ours\n")
    git("commit", "-qam", "ours", cwd=clone)
    with pytest.raises(GitPullError, match=r"git pull --ff-only.*failed") as error:
        git_pull(clone)
    assert "schedule.git_pull: false" in str(error.value)


def test_git_pull_outside_a_checkout_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(GitPullError, match="not a git checkout"):
        git_pull(tmp_path)
