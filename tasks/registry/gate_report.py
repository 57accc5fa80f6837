"""What the paired gate decided and on what evidence: registry tags, a JSON artifact, a page."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

GateMode = Literal["non_inferiority", "superiority"]


@dataclass(frozen=True)
class Interval:
    """A difference challenger - champion, with its bootstrap interval."""

    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class McNemar:
    """The images exactly one model gets right, and the exact two-sided p-value."""

    champion_only: int
    challenger_only: int
    p_value: float

    @property
    def discordant(self) -> int:
        """The images exactly one of the two models gets right: all the difference rests on them."""
        return self.champion_only + self.challenger_only


@dataclass(frozen=True)
class ClassCheck:
    """One class's recall for both models, and the interval of its change."""

    name: str
    images: int
    champion_recall: float
    challenger_recall: float
    change: Interval
    dropped: bool = False


@dataclass(frozen=True)
class GateReport:
    """Everything the gate decided on, for the registry's tags and the gate report artifact."""

    mode: GateMode
    metric: str
    images: int
    confidence: float
    margin: float
    max_class_drop: float
    difference: Interval
    mcnemar: McNemar
    classes: tuple[ClassCheck, ...]
    promote: bool
    reason: str

    @property
    def dropped_classes(self) -> list[str]:
        return [check.name for check in self.classes if check.dropped]

    def tags(self) -> dict[str, str]:
        """The decision in a few tags; the per-class table goes in the JSON report."""
        return {
            "gate.mode": self.mode,
            "gate.metric": self.metric,
            "gate.images": str(self.images),
            "gate.difference": f"{self.difference.estimate:.6f}",
            "gate.interval": f"[{self.difference.low:.6f}, {self.difference.high:.6f}]",
            "gate.confidence": f"{self.confidence:.3f}",
            "gate.margin": f"{self.margin:g}",
            "gate.max_class_drop": f"{self.max_class_drop:g}",
            "gate.discordant_images": str(self.mcnemar.discordant),
            "gate.mcnemar_p": f"{self.mcnemar.p_value:.6g}",
            "gate.dropped_classes": ",".join(self.dropped_classes),
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def markdown(self) -> str:
        """The report as a page: the decision, then one row per class."""
        rows = [
            f"| {check.name} | {check.images} | {check.champion_recall:.4f} | "
            f"{check.challenger_recall:.4f} | [{check.change.low:+.4f}, {check.change.high:+.4f}] | "
            f"{'**dropped**' if check.dropped else 'ok'} |"
            for check in self.classes
        ]
        return "\n".join(
            [
                f"# Promotion gate: {'promoted' if self.promote else 'rejected'}",
                "",
                self.summary(),
                "",
                f"The rule: {self.rule()}",
                "",
                f"McNemar: {self.mcnemar.champion_only} images only the champion gets right, "
                f"{self.mcnemar.challenger_only} only the challenger (exact p = "
                f"{self.mcnemar.p_value:.3g}).",
                "",
                "| class | images | champion recall | challenger recall | change interval | |",
                "|---|---|---|---|---|---|",
                *rows,
            ]
        )

    def rule(self) -> str:
        """The mode's rule in one sentence, with this decision's settings."""
        sure = f"{(1 + self.confidence) / 2:.0%}"
        shown = (
            f"at least {-self.margin:+g}, so the data show it at most {self.margin:g} worse"
            if self.mode == "non_inferiority"
            else f"above {self.margin:+g}, so the data show it better by more than {self.margin:g}"
        )
        return (
            f"{self.mode} promotes when the {sure} lower bound of challenger - champion is "
            f"{shown}, and no class's recall is shown to drop by more than {self.max_class_drop:g} "
            f"(the change's {sure} upper bound below {-self.max_class_drop:+g})."
        )

    def summary(self) -> str:
        """The decision in one line, as the training summary prints it."""
        low, high = self.difference.low, self.difference.high
        return (
            f"{self.mode}: {self.metric} challenger - champion {self.difference.estimate:+.4f}, "
            f"{self.confidence:.0%} interval [{low:+.4f}, {high:+.4f}] on {self.images} images, "
            f"McNemar p={self.mcnemar.p_value:.3g}; {self.reason}"
        )
