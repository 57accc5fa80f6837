"""How much a test set lets the non_inferiority gate show, worked out before any model exists."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

# The share of test images on which a retrain and the champion it is as good as disagree (one
# right, the other wrong), assumed before either exists: above what seed retrains of the demo
# config show, below what undertrained models show (docs/promotion-gate.md has the figures).
PLANNING_DISAGREEMENT = 0.08
PLANNED_PASS_CHANCE = 0.9


@dataclass(frozen=True)
class GatePower:
    """What a test set of `images` can show under non_inferiority, for models that disagree on
    `disagreement` of them: how often a challenger exactly as good as the champion passes."""

    images: int
    alpha: float
    margin: float
    disagreement: float
    pass_chance: float
    images_needed: int | None  # for the pass chance to reach PLANNED_PASS_CHANCE; None: none do
    margin_needed: float  # the margin that reaches it with these images

    @property
    def enough(self) -> bool:
        return self.pass_chance >= PLANNED_PASS_CHANCE

    def warning(self) -> str:
        return (
            f"registry: with {self.images:,} test images the non_inferiority gate can hardly show "
            f"a retrain as good as the champion to be at most {self.margin:g} worse: it would pass "
            f"about {self.pass_chance:.0%} of the time (alpha {self.alpha:g}, models that disagree "
            f"on {self.disagreement:.0%} of the images), and be rejected otherwise. "
            f"{self._images_advice()}registry.margin {self.margin_needed:.3f} would make that "
            f"{PLANNED_PASS_CHANCE:.0%} with these images."
        )

    def _images_advice(self) -> str:
        if (
            self.images_needed is None
        ):  # margin 0: an as-good retrain is rejected 1 - alpha of times
            return "No number of test images helps with a margin of 0; "
        return (
            f"About {self.images_needed:,} test images would make that {PLANNED_PASS_CHANCE:.0%}; "
        )


def non_inferiority_power(
    images: int, alpha: float, margin: float, disagreement: float = PLANNING_DISAGREEMENT
) -> GatePower:
    """The normal approximation of the paired test: between equally good models the difference
    on `images` images has standard error sqrt(disagreement / images), and the challenger passes
    when its estimate minus z(1 - alpha) of those stays above -margin."""
    z_alpha = stats.norm.ppf(1 - alpha)
    z_power = stats.norm.ppf(PLANNED_PASS_CHANCE)
    error = math.sqrt(disagreement / images) if images else math.inf
    chance = float(stats.norm.cdf(margin / error - z_alpha)) if error else 1.0
    needed = math.ceil(disagreement * ((z_alpha + z_power) / margin) ** 2) if margin else None
    return GatePower(
        images=images,
        alpha=alpha,
        margin=margin,
        disagreement=disagreement,
        pass_chance=chance,
        images_needed=needed,
        margin_needed=float((z_alpha + z_power) * error),
    )
