"""The MLflow model registry: register a challenger, move `champion` through the gate or by hand.

Every move of `champion` (gate, `promote_version`, `rollback_champion`) happens under one lock and
appends to one history, so moves from different processes or machines cannot interleave.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from conf.errors import ExpectedError
from tasks.runtime.credentials import redact_url

if TYPE_CHECKING:  # the training modules load TensorFlow; promoting by hand needs none of it
    from tasks.registry.gate import GateReport
    from tasks.stages.preflight import LoadedConfig

CHAMPION = "champion"
CHALLENGER = "challenger"
# A registered-model tag: the JSON list of champion versions, oldest first; rollback pops it.
HISTORY_TAG = "champion.history"
_HISTORY_LIMIT = 200
# The lock is a registered model of this name: creating one is atomic in every MLflow store.
LOCK_SUFFIX = ".promotion-lock"
MODEL_DESCRIPTION = (
    "Image classifier trained by the transfer-learning pipeline. Each version says what it was "
    "trained on and how it scored; its tags hold the data version, config hash and classes. "
    "Alias `champion`: the version that serves, moved only by the promotion gate or by hand "
    "(its history is the tag `champion.history`). Alias `challenger`: the latest version "
    "registered."
)


class RegistryActionError(ExpectedError, ValueError):
    """A promotion or rollback asked for something the registry cannot do as given."""


class UnknownModelVersionError(RegistryActionError):
    """The registered model or the version does not exist."""


class NoPreviousChampionError(RegistryActionError):
    """There is no earlier champion to roll back to."""


class PromotionLockTimeoutError(ExpectedError, RuntimeError):
    """Another promotion held the registry lock for longer than we would wait."""


class PromotionConflictError(ExpectedError, RuntimeError):
    """The champion kept changing while the challenger was being scored against it."""


@dataclass(frozen=True)
class ModelVersionRef:
    """A registered model version and what it was trained on."""

    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class PromotionDecision:
    """Whether the challenger becomes champion, with both scores and the reason in words."""

    promote: bool
    reason: str
    metric: str
    challenger_score: float
    champion_score: float | None = None
    champion_version: str | None = None
    report: GateReport | None = None  # the paired gate's evidence; None for the threshold gate

    def tags(self) -> dict[str, str]:
        gate = {} if self.report is None else self.report.tags()
        return gate | {
            "promotion.decision": "promoted" if self.promote else "rejected",
            "promotion.reason": self.reason,
            "promotion.metric": self.metric,
            "promotion.challenger_score": f"{self.challenger_score:.6f}",
            "promotion.champion_score": (
                "" if self.champion_score is None else f"{self.champion_score:.6f}"
            ),
            "promotion.champion_version": self.champion_version or "",
        }


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


def decide_promotion(
    metric: str,
    challenger_score: float,
    champion: ModelVersionRef | None,
    champion_score: float | None,
    *,
    min_value: float,
    min_improvement: float,
) -> PromotionDecision:
    """The gate: the challenger must reach `min_value` and beat the champion by `min_improvement`."""
    versus = (None, None) if champion is None else (champion_score, champion.version)

    def decided(promote: bool, reason: str) -> PromotionDecision:
        return PromotionDecision(promote, reason, metric, challenger_score, *versus)

    if challenger_score < min_value:
        reason = f"{metric} {challenger_score:.4f} is below the minimum {min_value:.4f}"
        return decided(False, reason)
    if champion is None:
        reason = (
            f"no champion yet; {metric} {challenger_score:.4f} meets the minimum {min_value:.4f}"
        )
        return decided(True, reason)
    if champion_score is None:
        reason = f"champion v{champion.version} cannot be scored on this test data; promote by hand"
        return decided(False, reason)
    needed = champion_score + min_improvement
    if challenger_score > needed:
        reason = (
            f"{metric} {challenger_score:.4f} beats champion v{champion.version}'s "
            f"{champion_score:.4f} by more than {min_improvement:.4f}"
        )
        return decided(True, reason)
    reason = (
        f"{metric} {challenger_score:.4f} does not beat champion v{champion.version}'s "
        f"{champion_score:.4f} by more than {min_improvement:.4f}"
    )
    return decided(False, reason)


def _version_ref(version) -> ModelVersionRef:
    return ModelVersionRef(version.name, str(version.version), version.run_id, dict(version.tags))


def aliased_version(uri: str, name: str, alias: str) -> ModelVersionRef | None:
    """The version an alias points to, or None when the model or the alias does not exist."""
    try:
        return _version_ref(MlflowClient(uri).get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            return None
        raise


def registered_version(uri: str, name: str, version: str | int) -> ModelVersionRef | None:
    """A version of a registered model, or None when the model or the version does not exist."""
    return _find_version(MlflowClient(uri), name, str(version))


def register_challenger(
    uri: str,
    model_uri: str,
    name: str,
    run_id: str,
    tags: dict[str, str],
    description: str | None = None,
) -> ModelVersionRef:
    """Register the model as a new version and point `challenger` at it.

    `description` becomes the version's; a registered model without a description of its own
    gets one that says what its aliases mean.
    """
    from tasks.runtime.tracking_server import using_tracking_uri

    with using_tracking_uri(uri):
        version = mlflow.register_model(model_uri, name, tags={**tags, "run_id": run_id})
    client = MlflowClient(uri)
    if description:
        client.update_model_version(name, str(version.version), description=description)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=MODEL_DESCRIPTION)
    client.set_registered_model_alias(name, CHALLENGER, str(version.version))
    return _version_ref(client.get_model_version(name, str(version.version)))


def load_keras_model(model_uri: str, uri: str):
    """A registered or logged model loaded back as Keras, to score it on fresh data."""
    from tasks.registry.serving import keras_model_of
    from tasks.runtime.tracking_server import using_tracking_uri

    with using_tracking_uri(uri):
        return keras_model_of(model_uri)


def record_decision(
    uri: str, challenger: ModelVersionRef, run_id: str, decision: PromotionDecision
) -> None:
    """Write the decision on the version and the run, then move `champion` if it passed.

    A promotion must hold `champion_lock`: `promote_through_gate` takes it.
    """
    client = MlflowClient(uri)
    _record(client, challenger.name, challenger.version, run_id, decision.tags())
    if decision.report is not None:
        client.log_text(run_id, decision.report.to_json(), "gate_report.json")
        client.log_text(run_id, decision.report.markdown(), "gate_report.md")
    if decision.promote:
        _move_champion(client, challenger.name, challenger.version)


def promote_through_gate(
    uri: str,
    challenger: ModelVersionRef,
    run_id: str,
    metric: str,
    challenger_score: float,
    decide: Callable[[ModelVersionRef | None], PromotionDecision],
    *,
    max_rounds: int = 5,
) -> PromotionDecision:
    """Apply the gate against the current champion; move `champion` only if it is still current.

    `decide` scores a champion (or None, when there is none) against the challenger. Scoring a
    champion takes minutes, so it runs outside the lock. Under the lock the champion is
    read again (compare-and-set): if another promotion moved it meanwhile, the challenger is scored
    against the new champion before anything moves. The alias therefore only ever points at a
    version that passed the gate against the version it replaces.
    """
    name = challenger.name
    champion = aliased_version(uri, name, CHAMPION)
    for _ in range(max_rounds):
        if champion is not None and champion.version == challenger.version:
            # Promoted by hand meanwhile: keep the record of that move.
            reason = f"v{challenger.version} is already the champion"
            return PromotionDecision(True, reason, metric, challenger_score, None, champion.version)
        decision = decide(champion)
        if not decision.promote:
            record_decision(uri, challenger, run_id, decision)
            return decision
        with champion_lock(uri, name):
            current = aliased_version(uri, name, CHAMPION)
            if _version_of(current) == _version_of(champion):
                record_decision(uri, challenger, run_id, decision)
                return decision
        champion = current
    raise PromotionConflictError(
        f"the champion of {name} changed {max_rounds} times while v{challenger.version} was being "
        f"scored; nothing was promoted. Promote it by hand if it should serve: transferflow "
        f"promote --model {name} --version {challenger.version}"
    )


def promote_version(uri: str, name: str, version: str | int, reason: str = "") -> ChampionMove:
    """Point `champion` at a version by hand, bypassing the gate, and record who did it and why."""
    client = MlflowClient(uri)
    target = _existing_version(client, uri, name, str(version))
    with champion_lock(uri, name):
        current = _version_of(aliased_version(uri, name, CHAMPION))
        if current == target.version:
            raise RegistryActionError(f"version {target.version} of {name} is already the champion")
        move = _hand_move(name, current, target.version, "promoted-by-hand", reason)
        _record(client, name, target.version, _run_of(target), move_tags(move))
        _move_champion(client, name, target.version)
    return move


def rollback_champion(uri: str, name: str, reason: str = "") -> ChampionMove:
    """Point `champion` back at the version that held it before the current one."""
    client = MlflowClient(uri)
    with champion_lock(uri, name):
        current = aliased_version(uri, name, CHAMPION)
        if current is None:
            _existing_model(client, uri, name)
            raise NoPreviousChampionError(
                f"{name} has no champion, so there is nothing to roll back"
            )
        history = champion_history(uri, name)
        # The newest entry is the current champion unless the alias was moved outside these
        # functions; versions deleted since they served are skipped.
        target = None
        while history and target is None:
            if history[-1] != current.version:
                target = _find_version(client, name, history[-1])
            if target is None:
                history.pop()
        if target is None:
            raise NoPreviousChampionError(
                f"{name} has no earlier champion to roll back to: v{current.version} is the first "
                "one on record. Promote another version by hand: transferflow promote --model "
                f"{name} --version N"
            )
        move = _hand_move(name, current.version, target.version, "rolled-back", reason)
        _record(client, name, target.version, _run_of(target), move_tags(move))
        client.set_registered_model_alias(name, CHAMPION, target.version)
        _write_history(client, name, history)
        client.set_model_version_tag(
            name,
            current.version,
            "promotion.withdrawn",
            f"rolled back to v{target.version} by {move.by} at {move.at}: {move.reason}",
        )
    return move


def champion_history(uri: str, name: str) -> list[str]:
    """The versions that have been champion, oldest first, as recorded on the registered model."""
    try:
        model = MlflowClient(uri).get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    return [str(v) for v in json.loads(model.tags.get(HISTORY_TAG) or "[]")]


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
    holder = f"{_user()}@{socket.gethostname()} pid {os.getpid()}"
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
            who = f"{held[0]} since {_iso(held[1])}" if held else "someone"
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


def _move_champion(client: MlflowClient, name: str, version: str) -> None:
    """Point `champion` at `version` and append it to the history; the caller holds the lock."""
    current = _version_of(aliased_version(client.tracking_uri, name, CHAMPION))
    history = champion_history(client.tracking_uri, name)
    if current is not None and (not history or history[-1] != current):
        history.append(current)  # a champion set before the history was kept, or outside it
    history.append(version)
    client.set_registered_model_alias(name, CHAMPION, version)
    _write_history(client, name, history)


def _write_history(client: MlflowClient, name: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-_HISTORY_LIMIT:]))


def _record(
    client: MlflowClient, name: str, version: str, run_id: str | None, tags: dict[str, str]
) -> None:
    """Tags on the version and on its run, with who and when added to what the caller says."""
    tags = {"promotion.by": _user(), "promotion.at": _iso(time.time())} | tags
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
        if run_id:
            client.set_tag(run_id, key, value)


def _hand_move(
    name: str, previous: str | None, champion: str, decision: str, reason: str
) -> ChampionMove:
    reason = reason.strip() or "no reason given"
    return ChampionMove(name, previous, champion, decision, reason, _user(), _iso(time.time()))


def _existing_model(client: MlflowClient, uri: str, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UnknownModelVersionError(
            f"there is no registered model {name!r} in {redact_url(uri)}; check --model and MLFLOW_TRACKING_URI"
        ) from None


def _existing_version(client: MlflowClient, uri: str, name: str, version: str) -> ModelVersionRef:
    _existing_model(client, uri, name)
    found = _find_version(client, name, version)
    if found is None:
        versions = sorted(
            (str(v.version) for v in client.search_model_versions(f"name = '{name}'")), key=int
        )
        raise UnknownModelVersionError(
            f"{name} has no version {version}; its versions are {', '.join(versions) or 'none'}"
        )
    return found


def _find_version(client: MlflowClient, name: str, version: str) -> ModelVersionRef | None:
    if not version.isdigit():
        return None
    try:
        return _version_ref(client.get_model_version(name, version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _version_of(ref: ModelVersionRef | None) -> str | None:
    return None if ref is None else ref.version


def _run_of(version: ModelVersionRef) -> str | None:
    """The pipeline run the gate records on (register_challenger's tag), else the model's run."""
    return version.tags.get("run_id") or version.run_id


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return "unknown"


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def config_fingerprint(loaded: LoadedConfig) -> str:
    """sha256 of the resolved training config, to tell later whether a retrain would differ."""
    # Whether stages may be resumed, how often a run beats, whether undecodable images fail
    # the run or are left out (a model is only ever trained on the decodable ones), how the
    # paired gate decides, and whether stages train through the activation cache change
    # nothing a retrain produces.
    tree = loaded.config.model_dump(
        mode="json",
        exclude={
            "demo": True,
            "tracking": {"resume", "heartbeat_seconds"},
            "registry": {"gate", "alpha", "margin", "max_class_drop"},
            "data": {"on_bad_images"},
            "fine_tune": {"activation_cache_mb"},
            "compute": True,
        },
    )
    tree.update(loaded.config.compute.non_default())  # precision and XLA change the weights
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()
