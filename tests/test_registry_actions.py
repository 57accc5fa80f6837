"""Moving `champion` by hand, rolling it back, and promotions racing, on a real MLflow registry."""

from __future__ import annotations

import getpass
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from tasks.registry import (
    CHAMPION,
    LOCK_SUFFIX,
    ModelVersionRef,
    NoPreviousChampionError,
    PromotionLockTimeoutError,
    RegistryActionError,
    UnknownModelVersionError,
    aliased_version,
    champion_history,
    champion_lock,
    promote_through_gate,
    promote_version,
    register_challenger,
    rollback_champion,
)

NAME = "registry-actions"
ROLLBACK_IN_ANOTHER_PROCESS = """
import sys
from tasks.registry import rollback_champion
move = rollback_champion(*sys.argv[1:])
print(move.previous, move.champion)
"""

Register = Callable[[], ModelVersionRef]


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite file with its tables made: copying it saves each test the ~3 s migration."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_registered_models()
    return path


@pytest.fixture
def register(mlflow_uri: str, tmp_path: Path, empty_store: Path) -> Register:
    """Register a new version of NAME, each from a pipeline run of its own, as the flow does.

    Promotion never loads the model, so the versions share one placeholder artifact folder.
    """
    shutil.copy(empty_store, mlflow_uri.removeprefix("sqlite:///"))
    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment("registry", (tmp_path / "artifacts").as_uri())
    source = tmp_path / "model"
    source.mkdir()

    def new_version() -> ModelVersionRef:
        run_id = client.create_run(experiment).info.run_id
        return register_challenger(mlflow_uri, str(source), NAME, run_id, {"classes": "[]"})

    return new_version


def champion(uri: str) -> str | None:
    found = aliased_version(uri, NAME, CHAMPION)
    return None if found is None else found.version


def gate(uri: str, challenger: ModelVersionRef, scores: dict[str, float], score=None):
    """The real gate on precomputed scores: a margin of 0.05 over the champion."""
    return promote_through_gate(
        uri,
        challenger,
        challenger.tags["run_id"],
        "accuracy",
        scores[challenger.version],
        score or (lambda version: scores[version.version]),
        min_value=0.3,
        min_improvement=0.05,
    )


def test_promotion_by_hand_moves_champion_and_records_who_why_and_when(
    mlflow_uri: str, register: Register
) -> None:
    register()
    second = register()
    first_move = promote_version(mlflow_uri, NAME, 1, "")
    assert (first_move.previous, first_move.champion) == (None, "1")
    move = promote_version(mlflow_uri, NAME, "2", "  fixes the night-shift photos ")

    client = MlflowClient(mlflow_uri)
    assert champion(mlflow_uri) == "2" == move.champion and move.previous == "1"
    for tags in (
        client.get_model_version(NAME, "2").tags,
        client.get_run(second.tags["run_id"]).data.tags,
    ):
        assert tags["promotion.decision"] == "promoted-by-hand"
        assert tags["promotion.reason"] == "fixes the night-shift photos"
        assert tags["promotion.champion_version"] == "1"
        assert tags["promotion.by"] == getpass.getuser()
        when = datetime.fromisoformat(tags["promotion.at"])
        assert abs(datetime.now(UTC) - when) < timedelta(minutes=2)
    assert client.get_model_version(NAME, "1").tags["promotion.reason"] == "no reason given"
    assert champion_history(mlflow_uri, NAME) == ["1", "2"]
    assert not client.search_registered_models(f"name = '{NAME}{LOCK_SUFFIX}'")


def test_rollback_walks_back_through_every_earlier_champion(
    mlflow_uri: str, register: Register
) -> None:
    scores = {"1": 0.6, "2": 0.5, "3": 0.9}
    versions = [register() for _ in range(3)]
    assert gate(mlflow_uri, versions[0], scores).promote  # first champion, through the gate
    assert not gate(mlflow_uri, versions[1], scores).promote
    promote_version(mlflow_uri, NAME, 2, "the gate's test set is stale")
    assert gate(mlflow_uri, versions[2], scores).promote
    assert champion_history(mlflow_uri, NAME) == ["1", "2", "3"]

    move = rollback_champion(mlflow_uri, NAME, "v3 mislabels boots")
    client = MlflowClient(mlflow_uri)
    assert (move.previous, move.champion, champion(mlflow_uri)) == ("3", "2", "2")
    restored = client.get_model_version(NAME, "2").tags
    assert restored["promotion.decision"] == "rolled-back"
    assert restored["promotion.reason"] == "rolled back from v3: v3 mislabels boots"
    assert client.get_run(versions[1].tags["run_id"]).data.tags["promotion.decision"] == (
        "rolled-back"
    )
    withdrawn = client.get_model_version(NAME, "3").tags["promotion.withdrawn"]
    assert withdrawn.startswith("rolled back to v2 by ") and "v3 mislabels boots" in withdrawn

    # The history lives in the registry: another process goes on from it.
    done = subprocess.run(
        [sys.executable, "-c", ROLLBACK_IN_ANOTHER_PROCESS, mlflow_uri, NAME, "v2 too"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "1"]
    assert champion(mlflow_uri) == "1"
    assert client.get_model_version(NAME, "1").tags["promotion.reason"] == (
        "rolled back from v2: v2 too"
    )

    with pytest.raises(NoPreviousChampionError, match="v1 is the first one on record"):
        rollback_champion(mlflow_uri, NAME)
    assert champion(mlflow_uri) == "1" and champion_history(mlflow_uri, NAME) == ["1"]


def test_rollback_follows_an_alias_moved_outside_transferflow(
    mlflow_uri: str, register: Register
) -> None:
    for _ in range(3):
        register()
    promote_version(mlflow_uri, NAME, 1)
    promote_version(mlflow_uri, NAME, 2)
    MlflowClient(mlflow_uri).set_registered_model_alias(NAME, CHAMPION, "3")  # e.g. in the UI
    assert rollback_champion(mlflow_uri, NAME).champion == "2"
    assert rollback_champion(mlflow_uri, NAME).champion == "1"


def test_unknown_versions_and_missing_champions_are_refused_with_the_fix(
    mlflow_uri: str, register: Register
) -> None:
    register()
    register()
    with pytest.raises(UnknownModelVersionError, match="no registered model 'nope'"):
        promote_version(mlflow_uri, "nope", 1)
    with pytest.raises(UnknownModelVersionError, match=f"{NAME} has no version 7; .* 1, 2$"):
        promote_version(mlflow_uri, NAME, 7)
    with pytest.raises(NoPreviousChampionError, match="has no champion"):
        rollback_champion(mlflow_uri, NAME)
    promote_version(mlflow_uri, NAME, 1)
    with pytest.raises(RegistryActionError, match="already the champion"):
        promote_version(mlflow_uri, NAME, 1)
    assert champion(mlflow_uri) == "1" and champion_history(mlflow_uri, NAME) == ["1"]

    runner = CliRunner()
    refused = runner.invoke(app, ["promote", "--model", NAME, "--version", "7"])
    assert refused.exit_code == 1 and "has no version 7" in refused.output
    refused = runner.invoke(app, ["rollback", "--model", NAME])
    assert refused.exit_code == 1 and "no earlier champion" in refused.output
    moved = runner.invoke(app, ["promote", "--model", NAME, "--version", "2", "--reason", "A/B"])
    assert moved.exit_code == 0, moved.output
    assert f"{NAME}: champion is now v2 (was v1)" in moved.output
    assert "promoted-by-hand by " in moved.output and moved.output.rstrip().endswith(": A/B")
    moved = runner.invoke(app, ["rollback", "--model", NAME])
    assert moved.exit_code == 0, moved.output
    assert f"{NAME}: champion is now v1 (was v2)" in moved.output
    assert champion(mlflow_uri) == "1"


@pytest.mark.parametrize("moves_first", ["2", "3"])
def test_racing_gate_promotions_leave_champion_on_a_version_vetted_against_it(
    mlflow_uri: str, register: Register, moves_first: str
) -> None:
    """v2 and v3 both beat champion v1; whichever moves second must also beat the other."""
    scores = {"1": 0.5, "2": 0.7, "3": 0.9}
    champion_v1, *challengers = [register() for _ in range(3)]
    promote_version(mlflow_uri, NAME, champion_v1.version)
    both_scored_v1 = threading.Barrier(2, timeout=60)
    first_done = threading.Event()
    scored_against: dict[str, list[str]] = {"2": [], "3": []}

    def scorer(challenger: str):
        def score(version: ModelVersionRef) -> float:
            scored_against[challenger].append(version.version)
            if version.version == "1":
                both_scored_v1.wait()  # neither moves before both have scored the old champion
                if challenger != moves_first:
                    assert first_done.wait(60)
            return scores[version.version]

        return score

    def promote(challenger: ModelVersionRef):
        try:
            return gate(mlflow_uri, challenger, scores, scorer(challenger.version))
        finally:
            if challenger.version == moves_first:
                first_done.set()

    with ThreadPoolExecutor(2) as pool:
        decided = pool.map(promote, challengers)
        decisions = {c.version: d for c, d in zip(challengers, decided, strict=True)}

    client = MlflowClient(mlflow_uri)
    assert champion(mlflow_uri) == "3"
    if moves_first == "2":
        assert scored_against["3"] == ["1", "2"]  # v1 moved away meanwhile: scored again
        assert decisions["2"].promote and decisions["3"].promote
        assert decisions["3"].champion_version == "2"
        assert champion_history(mlflow_uri, NAME) == ["1", "2", "3"]
    else:
        assert scored_against["2"] == ["1", "3"]
        assert not decisions["2"].promote and "does not beat champion v3" in decisions["2"].reason
        assert client.get_model_version(NAME, "2").tags["promotion.decision"] == "rejected"
        assert champion_history(mlflow_uri, NAME) == ["1", "3"]
    assert client.get_model_version(NAME, "3").tags["promotion.decision"] == "promoted"


def test_concurrent_promotions_by_hand_each_see_the_one_before(
    mlflow_uri: str, register: Register
) -> None:
    versions = [register().version for _ in range(4)]
    start = threading.Barrier(len(versions), timeout=60)

    def promote(version: str):
        start.wait()
        return promote_version(mlflow_uri, NAME, version, "race")

    with ThreadPoolExecutor(len(versions)) as pool:
        moves = list(pool.map(promote, versions))

    history = champion_history(mlflow_uri, NAME)
    assert sorted(history) == versions  # no move lost
    assert champion(mlflow_uri) == history[-1]
    for move in moves:  # each move happened whole, after the one before it
        position = history.index(move.champion)
        assert move.previous == (history[position - 1] if position else None)


def test_a_held_lock_names_its_holder_and_a_stale_one_is_broken(
    mlflow_uri: str, register: Register
) -> None:
    register()
    with (
        champion_lock(mlflow_uri, NAME),
        pytest.raises(PromotionLockTimeoutError, match=r"held the lock .* pid \d+ since"),
        champion_lock(mlflow_uri, NAME, timeout_s=0.3),
    ):
        pass
    client, lock = MlflowClient(mlflow_uri), f"{NAME}{LOCK_SUFFIX}"
    client.create_registered_model(lock, tags={"holder": "crashed pid 1"})
    with champion_lock(mlflow_uri, NAME, timeout_s=0.3, stale_after_s=-1):
        assert client.get_registered_model(lock).tags["holder"] != "crashed pid 1"
    assert not client.search_registered_models(f"name = '{lock}'")
