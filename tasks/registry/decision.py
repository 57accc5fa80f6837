"""The gate's decision on a challenger, and the move of `champion` it leads to under the lock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mlflow import MlflowClient

from conf.errors import ExpectedError
from tasks.registry.champion import champion_lock, move_champion, record_tags
from tasks.registry.gate_report import GateReport
from tasks.registry.versions import CHAMPION, ModelVersionRef, aliased_version, version_of


class PromotionConflictError(ExpectedError, RuntimeError):
    """The champion kept changing while the challenger was being scored against it."""


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


def record_decision(
    uri: str, challenger: ModelVersionRef, run_id: str, decision: PromotionDecision
) -> None:
    """Write the decision on the version and the run, then move `champion` if it passed.

    A promotion must hold `champion_lock`: `promote_through_gate` takes it.
    """
    client = MlflowClient(uri)
    record_tags(client, challenger.name, challenger.version, run_id, decision.tags())
    if decision.report is not None:
        client.log_text(run_id, decision.report.to_json(), "gate_report.json")
        client.log_text(run_id, decision.report.markdown(), "gate_report.md")
    if decision.promote:
        move_champion(client, challenger.name, challenger.version)


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
            if version_of(current) == version_of(champion):
                record_decision(uri, challenger, run_id, decision)
                return decision
        champion = current
    raise PromotionConflictError(
        f"the champion of {name} changed {max_rounds} times while v{challenger.version} was being "
        f"scored; nothing was promoted. Promote it by hand if it should serve: transferflow "
        f"promote --model {name} --version {challenger.version}"
    )
