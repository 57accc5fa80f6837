"""Moving `champion` by hand: promote a chosen version, or roll back to the one before it."""

from __future__ import annotations

import time
from dataclasses import dataclass

from mlflow import MlflowClient

from tasks.registry.champion import (
    champion_history,
    champion_lock,
    current_user,
    iso_time,
    move_champion,
    record_tags,
    write_history,
)
from tasks.registry.versions import (
    CHAMPION,
    ModelVersionRef,
    RegistryActionError,
    aliased_version,
    existing_model,
    existing_version,
    find_version,
    version_of,
)


class NoPreviousChampionError(RegistryActionError):
    """There is no earlier champion to roll back to."""


@dataclass(frozen=True)
class ChampionMove:
    """A move of `champion` made by hand: from which version to which, why, by whom and when."""

    name: str
    previous: str | None
    champion: str
    decision: str
    reason: str
    by: str
    at: str


def promote_version(uri: str, name: str, version: str | int, reason: str = "") -> ChampionMove:
    """Point `champion` at a version by hand, bypassing the gate, and record who did it and why."""
    client = MlflowClient(uri)
    target = existing_version(client, uri, name, str(version))
    with champion_lock(uri, name):
        current = version_of(aliased_version(uri, name, CHAMPION))
        if current == target.version:
            raise RegistryActionError(f"version {target.version} of {name} is already the champion")
        move = _hand_move(name, current, target.version, "promoted-by-hand", reason)
        record_tags(client, name, target.version, _run_of(target), move_tags(move))
        move_champion(client, name, target.version)
    return move


def rollback_champion(uri: str, name: str, reason: str = "") -> ChampionMove:
    """Point `champion` back at the version that held it before the current one."""
    client = MlflowClient(uri)
    with champion_lock(uri, name):
        current = aliased_version(uri, name, CHAMPION)
        if current is None:
            existing_model(client, uri, name)
            raise NoPreviousChampionError(
                f"{name} has no champion, so there is nothing to roll back"
            )
        history = champion_history(uri, name)
        # The newest entry is the current champion unless the alias was moved outside these
        # functions; versions deleted since they served are skipped.
        target = None
        while history and target is None:
            if history[-1] != current.version:
                target = find_version(client, name, history[-1])
            if target is None:
                history.pop()
        if target is None:
            raise NoPreviousChampionError(
                f"{name} has no earlier champion to roll back to: v{current.version} is the first "
                "one on record. Promote another version by hand: transferflow promote --model "
                f"{name} --version N"
            )
        move = _hand_move(name, current.version, target.version, "rolled-back", reason)
        record_tags(client, name, target.version, _run_of(target), move_tags(move))
        client.set_registered_model_alias(name, CHAMPION, target.version)
        write_history(client, name, history)
        client.set_model_version_tag(
            name,
            current.version,
            "promotion.withdrawn",
            f"rolled back to v{target.version} by {move.by} at {move.at}: {move.reason}",
        )
    return move


def move_tags(move: ChampionMove) -> dict[str, str]:
    """The tags a move by hand leaves on the version, in the gate's keys."""
    reason = move.reason
    if move.decision == "rolled-back":
        reason = f"rolled back from v{move.previous}: {reason}"
    return {
        "promotion.decision": move.decision,
        "promotion.reason": reason,
        "promotion.champion_version": move.previous or "",
        "promotion.by": move.by,
        "promotion.at": move.at,
    }


def _hand_move(
    name: str, previous: str | None, champion: str, decision: str, reason: str
) -> ChampionMove:
    reason = reason.strip() or "no reason given"
    return ChampionMove(
        name, previous, champion, decision, reason, current_user(), iso_time(time.time())
    )


def _run_of(version: ModelVersionRef) -> str | None:
    """The pipeline run the gate records on (register_challenger's tag), else the model's run."""
    return version.tags.get("run_id") or version.run_id
