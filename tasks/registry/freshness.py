"""Before a scheduled retrain: update the checkout, then retrain only if data or config moved on."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from conf.data import DataConfig
from conf.errors import ExpectedError
from conf.schema import PipelineConfig
from tasks.data.versioning import fingerprint_files, pinned_data_version
from tasks.registry.versions import (
    CHALLENGER,
    CHAMPION,
    ModelVersionRef,
    aliased_version,
    config_fingerprint,
)
from tasks.runtime.tracking_server import tracking_uri


class GitPullError(ExpectedError, RuntimeError):
    """`git pull` could not bring the project's checkout up to date."""


@dataclass(frozen=True)
class ProjectUpdate:
    """The commit the checkout was on before `git pull`, and the one it is on now."""

    before: str
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


@dataclass(frozen=True)
class RetrainDecision:
    """Whether the pipeline needs to train again, and why, in words."""

    retrain: bool
    reason: str
    model_name: str
    data_version: str | None
    config_sha256: str
    champion_version: str | None = None


def git_pull(project: Path) -> ProjectUpdate:
    """`git pull --ff-only` in the project, so the check sees the newest data.dvc and config."""
    before = _head(project)
    done = subprocess.run(
        ["git", "pull", "--ff-only"], cwd=project, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip()
        raise GitPullError(
            f"`git pull --ff-only` in {project} failed: {said}\n"
            "Make the checkout pullable (an upstream branch set, no local commits or conflicting "
            "edits, access to the remote), or set schedule.git_pull: false to retrain on the "
            "checkout as it is."
        )
    return ProjectUpdate(before=before, after=_head(project))


def _head(project: Path) -> str:
    done = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise GitPullError(
            f"{project} is not a git checkout with a commit ({done.stderr.strip()}); "
            "clone the project, or set schedule.git_pull: false"
        )
    return done.stdout.strip()


def training_data_version(data: DataConfig, project: Path) -> str | None:
    """The data version a training run would use now: the hash data.dvc pins, without pulling.

    None when the .dvc file is missing; training then stops with the message that says so.
    """
    if data.dvc_file is None:
        return fingerprint_files((project / data.path).resolve())
    return pinned_data_version.fn(data, project)


def _trained_on(version: ModelVersionRef, data_version: str | None, config: str) -> bool:
    return (
        data_version is not None
        and version.tags.get("data_version") == data_version
        and version.tags.get("config_sha256") == config
    )


def decide_retraining(
    model_name: str,
    data_version: str | None,
    config_sha256: str,
    champion: ModelVersionRef | None,
    challenger: ModelVersionRef | None,
) -> RetrainDecision:
    """Retrain unless the champion, or a challenger the gate rejected, saw this data and config.

    A rejected challenger counts because retraining the same seeded pipeline on the same inputs
    would only register the same loser again, every time the schedule fires.
    """

    def decided(retrain: bool, reason: str) -> RetrainDecision:
        return RetrainDecision(
            retrain=retrain,
            reason=reason,
            model_name=model_name,
            data_version=data_version,
            config_sha256=config_sha256,
            champion_version=champion.version if champion else None,
        )

    if champion is not None and _trained_on(champion, data_version, config_sha256):
        reason = (
            f"up to date: champion v{champion.version} of {model_name} was trained on data "
            f"{data_version} with this config ({config_sha256[:12]})"
        )
        return decided(False, reason)
    if (
        challenger is not None
        and _trained_on(challenger, data_version, config_sha256)
        and challenger.tags.get("promotion.decision") == "rejected"
    ):
        reason = (
            f"up to date: challenger v{challenger.version} of {model_name} was already trained on "
            f"data {data_version} with this config and the gate rejected it "
            f"({challenger.tags.get('promotion.reason', 'no reason recorded')}); "
            "change the data or the config to retrain"
        )
        return decided(False, reason)
    if champion is None:
        return decided(True, f"{model_name} has no champion yet")
    if data_version is None:
        return decided(True, "the data has no pinned version to compare")
    changes = []
    if champion.tags.get("data_version") != data_version:
        changes.append(
            f"data changed: champion v{champion.version} was trained on "
            f"{champion.tags.get('data_version', 'an unrecorded version')}, the data is now "
            f"{data_version}"
        )
    if champion.tags.get("config_sha256") != config_sha256:
        old = champion.tags.get("config_sha256", "unrecorded")[:12]
        changes.append(f"training config changed: sha256 {old} -> {config_sha256[:12]}")
    return decided(True, "; ".join(changes))


def check_against_registry(config: PipelineConfig, project: Path) -> RetrainDecision:
    """Compare the pinned data and the whole config (its fingerprint) with what the registered
    models were trained on."""
    uri = tracking_uri(project)
    name = config.registry.model_name
    return decide_retraining(
        name,
        training_data_version(config.data, project),
        config_fingerprint(config),
        aliased_version(uri, name, CHAMPION),
        aliased_version(uri, name, CHALLENGER),
    )


def decision_markdown(decision: RetrainDecision, update: ProjectUpdate | None) -> str:
    """The check as a short markdown note for the Prefect UI."""
    title = "retraining" if decision.retrain else "up to date, nothing trained"
    lines = [f"# Retraining check: {title}", "", f"{decision.reason}.", ""]
    if update is not None:
        pulled = (
            f"`git pull` moved {update.before[:10]} -> {update.after[:10]}"
            if update.changed
            else f"`git pull`: already at {update.after[:10]}"
        )
        lines.append(f"- {pulled}")
    lines += [
        f"- model: `{decision.model_name}`, champion: "
        + (f"v{decision.champion_version}" if decision.champion_version else "none"),
        f"- pinned data version: `{decision.data_version}`",
        f"- config sha256: `{decision.config_sha256}`",
    ]
    return "\n".join(lines)


# --- Prefect steps -------------------------------------------------------------------------------


@task(name="git-pull", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def update_checkout(project: Path) -> ProjectUpdate:
    """`git pull --ff-only` the project; retried, since a remote can be briefly unreachable."""
    return git_pull(project)


@task(name="check-for-changes", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def check_for_changes(config: PipelineConfig, project: Path) -> RetrainDecision:
    """Decide whether to retrain, from data.dvc, the config and the registry's tags."""
    decision = check_against_registry(config, project)
    get_run_logger().info("Retraining check: %s", decision.reason)
    return decision


@task(name="publish-retraining-check", cache_policy=NO_CACHE)
def publish_decision(decision: RetrainDecision, update: ProjectUpdate | None) -> None:
    """The check as a Prefect markdown artifact, on every run, trained or not."""
    create_markdown_artifact(
        decision_markdown(decision, update),
        key="retraining-check",
        description="Whether the scheduled run retrained, and why",
    )
