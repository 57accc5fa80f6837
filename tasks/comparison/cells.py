"""Comparison cells as plain values: one strategy at one label budget with one seed, and their plan.

A cell is described by plain values (config file, overrides, strategy, budget, data version), so
a local worker process and a flow run on a Prefect work pool can both run it. A cell returns only
its MLflow run id; the comparison reads everything else back from MLflow, where every worker
writes, and cells share frozen features (the feature cache) and finished stages (checkpoints).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from tasks.comparison.strategies import ComparisonPlan, shared_prefix, stage_path


class CellSpec(BaseModel):
    """One strategy at one label budget with one seed, as plain values a worker anywhere can use.

    The seed draws the cell's labelled images and initialises and shuffles its training; the
    split stays on the config's `seed`, so every cell is tested on the same images. `after`
    lists the cells that must finish first: the one whose stages this cell begins with, or, on a
    work pool, for the first transfer cell of any other budget or seed, the very first one's (its
    features are cached by then; local workers find them cached by the flow before any cell).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    config_path: str
    overrides: tuple[str, ...] = ()
    strategy: str
    labels_per_class: int
    seed: int
    comparison_id: str
    data_version: str
    after: tuple[str, ...] = ()
    skipped_images: tuple[str, ...] = ()  # undecodable files the comparison left out
    dropped_images: tuple[str, ...] = ()  # images the data gate dropped (data.checks: drop)
    # Every seed's images at the largest budget: the training images whose frozen features all
    # the comparison's cells share.
    pool_seeds: tuple[int, ...] = ()
    pool_budget: int | None = None
    # Every training image instead: the data gate's label check computed them all anyway.
    pool_whole_split: bool = False

    @property
    def id(self) -> str:
        return cell_id(self.strategy, self.labels_per_class, self.seed)


def cell_id(strategy: str, labels_per_class: int, seed: int) -> str:
    return f"{strategy}@{labels_per_class}/seed={seed}"


@task(name="plan-cells", cache_policy=NO_CACHE)
def plan_cells(
    plan: ComparisonPlan,
    config_path: str,
    overrides: Sequence[str],
    data_version: str,
    skipped: Sequence[tuple[str, str]] = (),
    dropped: Sequence[str] = (),
    pool_whole_split: bool = False,
    features_cached_first: bool = False,
) -> list[CellSpec]:
    """Every strategy at every budget with every seed, each after the cell it can resume from.

    Seeds come outermost, so the whole grid of the first seed finishes first. Unless the flow
    caches the shared features before any cell (`features_cached_first`), every transfer cell
    that resumes nothing waits for the first one, which caches them.

    The config file is named by its absolute path: workers on other machines need the project
    checked out at the same place. `skipped` are the undecodable files (and why) the comparison
    leaves out under `data.on_bad_images: skip`, so no worker decodes every image again;
    `dropped` the images the data gate dropped from training, so no worker checks them again.
    With `pool_whole_split` the cells share the features of every training image, which the
    data gate's label check cached, instead of those their seeds draw.
    """
    config_path = str(Path(config_path).resolve())
    paths = {strategy.name: stage_path(strategy) for strategy in plan.strategies}
    first = first_transfer_cell(plan)
    cells = []
    for seed, budget in itertools.product(plan.seeds, plan.label_budgets):
        for index, strategy in enumerate(plan.strategies):
            after: list[str] = []
            longest = 0
            for earlier in plan.strategies[:index]:
                shared = shared_prefix(paths[strategy.name], paths[earlier.name])
                if shared > longest:
                    longest, after = shared, [cell_id(earlier.name, budget, seed)]
            here = cell_id(strategy.name, budget, seed)
            if not (after or strategy.from_scratch or features_cached_first or here == first):
                assert first is not None
                after = [first]
            cells.append(
                CellSpec(
                    config_path=config_path,
                    overrides=tuple(overrides),
                    strategy=strategy.name,
                    labels_per_class=budget,
                    seed=seed,
                    comparison_id=plan.comparison_id,
                    data_version=data_version,
                    after=tuple(after),
                    skipped_images=tuple(path for path, _ in skipped),
                    dropped_images=tuple(dropped),
                    pool_seeds=plan.seeds,
                    pool_budget=max(plan.label_budgets),
                    pool_whole_split=pool_whole_split,
                )
            )
    return cells


def first_transfer_cell(plan: ComparisonPlan) -> str | None:
    """The id of the comparison's first cell that trains on the frozen base's features."""
    strategy = next((s for s in plan.strategies if not s.from_scratch), None)
    if strategy is None:
        return None
    return cell_id(strategy.name, plan.label_budgets[0], plan.seeds[0])


def in_dependency_order(cells: Sequence[CellSpec]) -> list[CellSpec]:
    """Each seed's cells, those that wait for no other first, then those one cell deep, and so on.

    Cells are handed to the workers in this order: Prefect's process pool resolves a cell's
    upstream cells in as many threads as it has workers, so a cell that waits would otherwise
    hold back a ready one queued behind it, and leave a worker idle.
    """
    depth: dict[str, int] = {}
    seeds: dict[int, int] = {}
    for cell in cells:  # planned so that a cell comes after those it waits for
        depth[cell.id] = 1 + max((depth[upstream] for upstream in cell.after), default=-1)
        seeds.setdefault(cell.seed, len(seeds))
    return sorted(cells, key=lambda cell: (seeds[cell.seed], depth[cell.id]))
