"""Strategies that begin with the same stages: which cells wait for which, and what they share."""

from __future__ import annotations

import json
from pathlib import Path

from conf import LoadedConfig, load_config
from tasks.comparison.cells import in_dependency_order, plan_cells
from tasks.comparison.strategies import (
    ComparisonPlan,
    resolve_strategies,
    shared_prefix,
    stage_path,
)

ROOT = Path(__file__).resolve().parents[1]
# A ladder of fine-tuning depths, each beginning with the shallower one's stages.
LADDER = [
    {"name": "from_scratch", "from_scratch": True},
    {"name": "feature_extraction", "fine_tune": {"stages": []}},
    *(
        {
            "name": f"fine_tune_{depth}",
            "fine_tune": {
                "stages": [{"unfreeze_blocks": b, "epochs": 4} for b in (2, 4, 8)[:depth]]
            },
        }
        for depth in (1, 2, 3)
    ),
    {"name": "full_unfreeze", "fine_tune": {"stages": [{"unfreeze_blocks": "all", "epochs": 4}]}},
]


def strategies(*overrides: str) -> dict:
    ladder = f"compare.strategies={json.dumps(LADDER)}"
    loaded = LoadedConfig(load_config(ROOT / "conf" / "compare.yaml", [ladder, *overrides]), ROOT)
    return {s.name: s for s in resolve_strategies(loaded)}


def test_deeper_fine_tuning_begins_with_the_shallower_strategies_stages() -> None:
    found = strategies()
    fe, ft1, ft2, ft3 = (
        stage_path(found[name])
        for name in ("feature_extraction", "fine_tune_1", "fine_tune_2", "fine_tune_3")
    )
    assert (len(fe), len(ft1), len(ft2), len(ft3)) == (1, 2, 3, 4)
    assert ft3[:3] == ft2 and ft2[:2] == ft1 and ft1[:1] == fe
    full = stage_path(found["full_unfreeze"])
    assert shared_prefix(full, ft1) == 1  # same head, a different first unfreezing stage
    assert shared_prefix(stage_path(found["from_scratch"]), fe) == 0


def test_a_different_seed_learning_rate_or_image_size_shares_nothing() -> None:
    base = stage_path(strategies()["fine_tune_2"])
    for override in ("seed=7", "data.image_size=80", "feature_extraction.learning_rate=0.01"):
        assert shared_prefix(stage_path(strategies(override)["fine_tune_2"]), base) == 0, override
    slower = stage_path(strategies("fine_tune.lr_factor=0.5")["fine_tune_2"])
    assert shared_prefix(slower, base) == 1  # the head's stage only
    elsewhere = stage_path(strategies("feature_extraction.cache_dir=/tmp/x")["fine_tune_2"])
    assert elsewhere == base  # where features are cached changes no stage


def test_each_cell_waits_for_the_cell_whose_stages_it_resumes() -> None:
    found = strategies()
    plan = ComparisonPlan("cmp", tuple(found.values()), (10, 25), "accuracy", seeds=(1, 2))
    planned = plan_cells.fn(plan, "conf/compare.yaml", [], "v1")
    cells = {cell.id: cell for cell in planned}
    assert len(cells) == 24

    def after(strategy: str, budget: int, seed: int) -> tuple[str, ...]:
        return cells[f"{strategy}@{budget}/seed={seed}"].after

    assert after("from_scratch", 10, 1) == () and after("from_scratch", 25, 2) == ()
    assert after("feature_extraction", 10, 1) == ()
    assert after("fine_tune_1", 10, 1) == ("feature_extraction@10/seed=1",)
    assert after("fine_tune_3", 25, 2) == ("fine_tune_2@25/seed=2",)
    assert after("full_unfreeze", 25, 1) == ("feature_extraction@25/seed=1",)
    # A seed trains its own stages: no cell resumes another seed's.
    assert after("fine_tune_1", 10, 2) == ("feature_extraction@10/seed=2",)
    # Validation and test features are cached by the very first transfer cell.
    assert after("feature_extraction", 25, 1) == ("feature_extraction@10/seed=1",)
    assert after("feature_extraction", 10, 2) == ("feature_extraction@10/seed=1",)
    # The first seed's whole grid comes first.
    assert [cell.seed for cell in planned] == [1] * 12 + [2] * 12
    assert Path(cells["fine_tune_1@10/seed=1"].config_path).is_absolute()


def test_with_features_cached_first_cells_wait_only_for_the_stages_they_resume() -> None:
    """Local workers find the shared features cached by the flow: a cell waits for no other
    budget's or seed's, and each seed's cells that wait for nothing are handed out first, so no
    waiting cell holds back a ready one."""
    found = strategies()
    plan = ComparisonPlan("cmp", tuple(found.values()), (10, 25), "accuracy", seeds=(2, 1))
    planned = plan_cells.fn(plan, "conf/compare.yaml", [], "v1", features_cached_first=True)
    cells = {cell.id: cell for cell in planned}
    assert cells["feature_extraction@25/seed=2"].after == ()
    assert cells["feature_extraction@10/seed=1"].after == ()
    assert cells["fine_tune_1@25/seed=1"].after == ("feature_extraction@25/seed=1",)

    order = [cell.id for cell in in_dependency_order(planned)]
    assert sorted(order) == sorted(cells)
    assert [cells[name].seed for name in order] == [2] * 12 + [1] * 12
    seed_2 = order[:12]
    assert seed_2[:4] == [
        "from_scratch@10/seed=2",
        "feature_extraction@10/seed=2",
        "from_scratch@25/seed=2",
        "feature_extraction@25/seed=2",
    ]
    for position, name in enumerate(order):
        assert all(order.index(upstream) < position for upstream in cells[name].after), name
