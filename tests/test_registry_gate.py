"""The promotion gate's decisions, as a pure function."""

from __future__ import annotations

import pytest

from tasks.registry.decision import decide_promotion
from tasks.registry.versions import ModelVersionRef

CHAMPION = ModelVersionRef("m", "3", "run", {})


def decide(score: float, champion_score: float | None, champion=CHAMPION, **gate):
    gate = {"min_value": 0.8, "min_improvement": 0.01} | gate
    return decide_promotion("accuracy", score, champion, champion_score, **gate)


def test_first_model_above_minimum_is_promoted() -> None:
    decision = decide(0.85, None, champion=None)
    assert decision.promote and "no champion" in decision.reason


def test_below_minimum_is_rejected_even_without_champion() -> None:
    decision = decide(0.79, None, champion=None)
    assert not decision.promote and "below the minimum 0.8000" in decision.reason


@pytest.mark.parametrize(("score", "promoted"), [(0.861, True), (0.86, False), (0.84, False)])
def test_challenger_must_beat_champion_by_the_margin(score: float, promoted: bool) -> None:
    decision = decide(score, 0.85)
    assert decision.promote is promoted
    assert decision.champion_version == "3" and decision.champion_score == 0.85
    assert decision.tags()["promotion.decision"] == ("promoted" if promoted else "rejected")


def test_champion_that_cannot_be_scored_stays() -> None:
    decision = decide(0.99, None)
    assert not decision.promote and "promote by hand" in decision.reason
