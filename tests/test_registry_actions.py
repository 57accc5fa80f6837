"""Moving `champion` by hand, rolling it back, and promotions racing, on a real MLflow registry."""

from __future__ import annotations

import getpass
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from tasks.registry.champion import (
    LOCK_SUFFIX,
    PromotionLockTimeoutError,
    champion_history,
    champion_lock,
)
from tasks.registry.decision import PromotionDecision, decide_promotion, promote_through_gate
from tasks.registry.hand_moves import NoPreviousChampionError, promote_version, rollback_champion
from tasks.registry.versions import (
    CHAMPION,
    ModelVersionRef,
    RegistryActionError,
    UnknownModelVersionError,
    aliased_version,
    register_challenger,
)

pytestmark = pytest.mark.integration

ROLLBACK_IN_ANOTHER_PROCESS = """
import sys
from tasks.registry.hand_moves import rollback_champion
move = rollback_champion(*sys.argv[1:])
print(move.previous, move.champion)
"""

Register = Callable[[], ModelVersionRef]


@pytest.fixture
def register(server_uri: str, unique_name: str) -> Register:
    """Register a new version of `unique_name`, each from a pipeline run of its own, as the flow does.

    Promotion never loads the model, so each version is a logged model with no files.
    """
    client = MlflowClient(server_uri)
    experiment = client.create_experiment(unique_name)

    def new_version() -> ModelVersionRef:
        run_id = client.create_run(experiment).info.run_id
        model = client.create_logged_model(experiment, "model", source_run_id=run_id)
        return register_challenger(
            server_uri, f"models:/{model.model_id}", unique_name, run_id, {"classes": "[]"}
        )

    return new_version


def champion(uri: str, name: str) -> str | None:
    found = aliased_version(uri, name, CHAMPION)
    return None if found is None else found.version


def gate(uri: str, challenger: ModelVersionRef, scores: dict[str, float], score=None):
    """The real gate on precomputed scores: a margin of 0.05 over the champion."""
    score_champion = score or (lambda version: scores[version.version])

    def decide(current: ModelVersionRef | None) -> PromotionDecision:
        return decide_promotion(
            "accuracy",
            scores[challenger.version],
            current,
            None if current is None else score_champion(current),
            min_value=0.3,
            min_improvement=0.05,
        )

    return promote_through_gate(
        uri, challenger, challenger.tags["run_id"], "accuracy", scores[challenger.version], decide
    )


def test_promotion_by_hand_moves_champion_and_records_who_why_and_when(
    server_uri: str, unique_name: str, register: Register
) -> None:
    register()
    second = register()
    first_move = promote_version(server_uri, unique_name, 1, "")
    assert (first_move.previous, first_move.champion) == (None, "1")
    move = promote_version(server_uri, unique_name, "2", "  fixes the night-shift photos ")

    client = MlflowClient(server_uri)
    assert champion(server_uri, unique_name) == "2" == move.champion and move.previous == "1"
    for tags in (
        client.get_model_version(unique_name, "2").tags,
        client.get_run(second.tags["run_id"]).data.tags,
    ):
        assert tags["promotion.decision"] == "promoted-by-hand"
        assert tags["promotion.reason"] == "fixes the night-shift photos"
        assert tags["promotion.champion_version"] == "1"
        assert tags["promotion.by"] == getpass.getuser()
        when = datetime.fromisoformat(tags["promotion.at"])
        assert abs(datetime.now(UTC) - when) < timedelta(minutes=2)
    assert client.get_model_version(unique_name, "1").tags["promotion.reason"] == "no reason given"
    assert champion_history(server_uri, unique_name) == ["1", "2"]
    assert not client.search_registered_models(f"name = '{unique_name}{LOCK_SUFFIX}'")


def test_rollback_walks_back_through_every_earlier_champion(
    server_uri: str, unique_name: str, register: Register
) -> None:
    scores = {"1": 0.6, "2": 0.5, "3": 0.9}
    versions = [register() for _ in range(3)]
    assert gate(server_uri, versions[0], scores).promote  # first champion, through the gate
    assert not gate(server_uri, versions[1], scores).promote
    assert champion(server_uri, unique_name) == "1"  # the worse challenger left it in place
    promote_version(server_uri, unique_name, 2, "the gate's test set is stale")
    assert gate(server_uri, versions[2], scores).promote
    assert champion_history(server_uri, unique_name) == ["1", "2", "3"]

    move = rollback_champion(server_uri, unique_name, "v3 mislabels boots")
    client = MlflowClient(server_uri)
    assert (move.previous, move.champion, champion(server_uri, unique_name)) == ("3", "2", "2")
    restored = client.get_model_version(unique_name, "2").tags
    assert restored["promotion.decision"] == "rolled-back"
    assert restored["promotion.reason"] == "rolled back from v3: v3 mislabels boots"
    assert client.get_run(versions[1].tags["run_id"]).data.tags["promotion.decision"] == (
        "rolled-back"
    )
    withdrawn = client.get_model_version(unique_name, "3").tags["promotion.withdrawn"]
    assert withdrawn.startswith("rolled back to v2 by ") and "v3 mislabels boots" in withdrawn

    # The history lives in the registry: another process goes on from it.
    done = subprocess.run(
        [sys.executable, "-c", ROLLBACK_IN_ANOTHER_PROCESS, server_uri, unique_name, "v2 too"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "1"]
    assert champion(server_uri, unique_name) == "1"
    assert client.get_model_version(unique_name, "1").tags["promotion.reason"] == (
        "rolled back from v2: v2 too"
    )

    with pytest.raises(NoPreviousChampionError, match="v1 is the first one on record"):
        rollback_champion(server_uri, unique_name)
    assert champion(server_uri, unique_name) == "1" and champion_history(
        server_uri, unique_name
    ) == ["1"]


def test_rollback_follows_an_alias_moved_outside_transferflow(
    server_uri: str, unique_name: str, register: Register
) -> None:
    for _ in range(3):
        register()
    promote_version(server_uri, unique_name, 1)
    promote_version(server_uri, unique_name, 2)
    MlflowClient(server_uri).set_registered_model_alias(
        unique_name, CHAMPION, "3"
    )  # e.g. in the UI
    assert rollback_champion(server_uri, unique_name).champion == "2"
    assert rollback_champion(server_uri, unique_name).champion == "1"


def test_unknown_versions_and_missing_champions_are_refused_with_the_fix(
    server_uri: str, unique_name: str, register: Register
) -> None:
    register()
    register()
    with pytest.raises(UnknownModelVersionError, match="no registered model 'nope'"):
        promote_version(server_uri, "nope", 1)
    with pytest.raises(UnknownModelVersionError, match=f"{unique_name} has no version 7; .* 1, 2$"):
        promote_version(server_uri, unique_name, 7)
    with pytest.raises(NoPreviousChampionError, match="has no champion"):
        rollback_champion(server_uri, unique_name)
    promote_version(server_uri, unique_name, 1)
    with pytest.raises(RegistryActionError, match="already the champion"):
        promote_version(server_uri, unique_name, 1)
    assert champion(server_uri, unique_name) == "1" and champion_history(
        server_uri, unique_name
    ) == ["1"]

    runner = CliRunner()
    refused = runner.invoke(app, ["promote", "--model", unique_name, "--version", "7"])
    assert refused.exit_code == 2 and "has no version 7" in refused.output
    refused = runner.invoke(app, ["rollback", "--model", unique_name])
    assert refused.exit_code == 2 and "no earlier champion" in refused.output
    moved = runner.invoke(
        app, ["promote", "--model", unique_name, "--version", "2", "--reason", "A/B"]
    )
    assert moved.exit_code == 0, moved.output
    assert f"{unique_name}: champion is now v2 (was v1)" in moved.output
    assert "promoted-by-hand by " in moved.output and moved.output.rstrip().endswith(": A/B")
    moved = runner.invoke(app, ["rollback", "--model", unique_name])
    assert moved.exit_code == 0, moved.output
    assert f"{unique_name}: champion is now v1 (was v2)" in moved.output
    assert champion(server_uri, unique_name) == "1"


@pytest.mark.parametrize("moves_first", ["2", "3"])
def test_racing_gate_promotions_leave_champion_on_a_version_vetted_against_it(
    server_uri: str, unique_name: str, register: Register, moves_first: str
) -> None:
    """v2 and v3 both beat champion v1; whichever moves second must also beat the other."""
    scores = {"1": 0.5, "2": 0.7, "3": 0.9}
    champion_v1, *challengers = [register() for _ in range(3)]
    promote_version(server_uri, unique_name, champion_v1.version)
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
            return gate(server_uri, challenger, scores, scorer(challenger.version))
        finally:
            if challenger.version == moves_first:
                first_done.set()

    with ThreadPoolExecutor(2) as pool:
        decided = pool.map(promote, challengers)
        decisions = {c.version: d for c, d in zip(challengers, decided, strict=True)}

    client = MlflowClient(server_uri)
    assert champion(server_uri, unique_name) == "3"
    if moves_first == "2":
        assert scored_against["3"] == ["1", "2"]  # v1 moved away meanwhile: scored again
        assert decisions["2"].promote and decisions["3"].promote
        assert decisions["3"].champion_version == "2"
        assert champion_history(server_uri, unique_name) == ["1", "2", "3"]
    else:
        assert scored_against["2"] == ["1", "3"]
        assert not decisions["2"].promote and "does not beat champion v3" in decisions["2"].reason
        assert client.get_model_version(unique_name, "2").tags["promotion.decision"] == "rejected"
        assert champion_history(server_uri, unique_name) == ["1", "3"]
    assert client.get_model_version(unique_name, "3").tags["promotion.decision"] == "promoted"


def test_concurrent_promotions_by_hand_each_see_the_one_before(
    server_uri: str, unique_name: str, register: Register
) -> None:
    versions = [register().version for _ in range(4)]
    start = threading.Barrier(len(versions), timeout=60)

    def promote(version: str):
        start.wait()
        return promote_version(server_uri, unique_name, version, "race")

    with ThreadPoolExecutor(len(versions)) as pool:
        moves = list(pool.map(promote, versions))

    history = champion_history(server_uri, unique_name)
    assert sorted(history) == versions  # no move lost
    assert champion(server_uri, unique_name) == history[-1]
    for move in moves:  # each move happened whole, after the one before it
        position = history.index(move.champion)
        assert move.previous == (history[position - 1] if position else None)


def test_a_held_lock_names_its_holder_and_a_stale_one_is_broken(
    server_uri: str, unique_name: str, register: Register
) -> None:
    register()
    with (
        champion_lock(server_uri, unique_name),
        pytest.raises(PromotionLockTimeoutError, match=r"held the lock .* pid \d+ since"),
        champion_lock(server_uri, unique_name, timeout_s=0.3),
    ):
        pass
    client, lock = MlflowClient(server_uri), f"{unique_name}{LOCK_SUFFIX}"
    client.create_registered_model(lock, tags={"holder": "crashed pid 1"})
    with champion_lock(server_uri, unique_name, timeout_s=0.3, stale_after_s=-1):
        assert client.get_registered_model(lock).tags["holder"] != "crashed pid 1"
    assert not client.search_registered_models(f"name = '{lock}'")


def test_registry_commands_on_a_server_that_is_down_fail_at_once_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """Not minutes of MLflow retries: the command says which server, without its password."""
    from PIL import Image

    from tests.servers import free_port

    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://ops:s3cret@127.0.0.1:{port}")
    # The CLI moves the credentials into MLflow's variables: undo that after the test too.
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "one.png")
    runner = CliRunner()
    for command in (
        ["promote", "--model", "classifier", "--version", "2"],
        ["rollback", "--model", "classifier"],
        ["predict", "--model", "models:/classifier@champion", "--images", str(tmp_path / "images")],
    ):
        refused = runner.invoke(app, command)
        assert refused.exit_code == 2, refused.output
        assert f"http://127.0.0.1:{port} (MLFLOW_TRACKING_URI) does not answer" in refused.output
        assert "s3cret" not in refused.output
