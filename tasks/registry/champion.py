"""The `champion` alias: the lock that serialises its moves, and the history they append to.

Every move of `champion` (gate, `promote_version`, `rollback_champion`) happens under one lock and
appends to one history, so moves from different processes or machines cannot interleave.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from conf.errors import ExpectedError
from tasks.registry.versions import CHAMPION, aliased_version, version_of

# A registered-model tag: the JSON list of champion versions, oldest first; rollback pops it.
HISTORY_TAG = "champion.history"
_HISTORY_LIMIT = 200
# The lock is a registered model of this name: creating one is atomic in every MLflow store.
LOCK_SUFFIX = ".promotion-lock"


class PromotionLockTimeoutError(ExpectedError, RuntimeError):
    """Another promotion held the registry lock for longer than we would wait."""


def champion_history(uri: str, name: str) -> list[str]:
    """The versions that have been champion, oldest first, as recorded on the registered model."""
    try:
        model = MlflowClient(uri).get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    return [str(v) for v in json.loads(model.tags.get(HISTORY_TAG) or "[]")]


@contextmanager
def champion_lock(
    uri: str, name: str, *, timeout_s: float = 120.0, stale_after_s: float = 600.0
) -> Iterator[None]:
    """Hold the registry-wide lock on `name`'s champion: the registered model `<name>.promotion-lock`.

    MLflow has no compare-and-set on aliases, but creating a registered model that already exists
    fails in every store (a unique key in SQL, the same error over REST), so it works as a mutex
    across processes and machines. A lock older than `stale_after_s` is left by a crashed process
    and is broken.
    """
    client = MlflowClient(uri)
    lock = f"{name}{LOCK_SUFFIX}"
    holder = f"{current_user()}@{socket.gethostname()} pid {os.getpid()}"
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"holder": holder},
                description=f"Held while {holder} moves the champion of {name}; removed after.",
            )
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        held = _lock_holder(client, lock)
        if held is not None and time.time() - held[1] > stale_after_s:
            _delete_lock(client, lock)
            continue
        if time.monotonic() > deadline:
            who = f"{held[0]} since {iso_time(held[1])}" if held else "someone"
            raise PromotionLockTimeoutError(
                f"another promotion of {name} has held the lock {lock!r} ({who}) for over "
                f"{timeout_s:.0f} s. Wait and retry; if no promotion is running, delete the "
                f"registered model {lock!r} (MLflow UI, Models) and retry."
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    try:
        yield
    finally:
        _delete_lock(client, lock)


def _lock_holder(client: MlflowClient, lock: str) -> tuple[str, float] | None:
    try:
        model = client.get_registered_model(lock)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None  # released meanwhile
        raise
    return model.tags.get("holder", "unknown"), model.creation_timestamp / 1000


def _delete_lock(client: MlflowClient, lock: str) -> None:
    try:
        client.delete_registered_model(lock)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def move_champion(client: MlflowClient, name: str, version: str) -> None:
    """Point `champion` at `version` and append it to the history; the caller holds the lock."""
    current = version_of(aliased_version(client.tracking_uri, name, CHAMPION))
    history = champion_history(client.tracking_uri, name)
    if current is not None and (not history or history[-1] != current):
        history.append(current)  # a champion set before the history was kept, or outside it
    history.append(version)
    client.set_registered_model_alias(name, CHAMPION, version)
    write_history(client, name, history)


def write_history(client: MlflowClient, name: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-_HISTORY_LIMIT:]))


def record_tags(
    client: MlflowClient, name: str, version: str, run_id: str | None, tags: dict[str, str]
) -> None:
    """Tags on the version and on its run, with who and when added to what the caller says."""
    tags = {"promotion.by": current_user(), "promotion.at": iso_time(time.time())} | tags
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
        if run_id:
            client.set_tag(run_id, key, value)


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return "unknown"


def iso_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")
