"""One comparison cell as a flow of its own, for the `train-comparison-cell` deployment on a work pool."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from prefect import Flow, flow

from tasks.comparison.cell_training import train_cell_step
from tasks.comparison.cells import CellSpec
from tasks.comparison.work_pool import check_cell_data
from tasks.comparison.workers import use_tensorflow_threads
from tasks.data.versioning import pull_data_version
from tasks.stages.preflight import load_pipeline_config


@flow(name="train-comparison-cell", flow_run_name="cell {cell.id}", log_prints=True)
def train_comparison_cell(cell: CellSpec) -> str:
    """Pull the data version the comparison uses, then train the cell; its MLflow run id.

    TensorFlow runs on `compare.threads_per_worker` threads when set, else on every core.
    """
    loaded = load_pipeline_config(cell.config_path, list(cell.overrides))
    use_tensorflow_threads(loaded.config.compare.threads_per_worker)
    config = loaded.config
    check_cell_data(
        cell, pull_data_version(config.data, loaded.project, config.timeouts.dvc_pull_seconds)
    )
    return train_cell_step(cell)


def deploy_cells(work_pool: str) -> str:
    """Register `train-comparison-cell/<work_pool>` for the pool's workers; returns its full name.

    Workers run the flow from this checkout, so each worker machine needs it at the same path.
    """
    code = Path(__file__).resolve().parents[1]
    from_code = train_comparison_cell.from_source(
        str(code), "flows/compare_cell.py:train_comparison_cell"
    )
    cast(Flow, from_code).deploy(  # from_source returns the flow itself when called without await
        name=work_pool,
        work_pool_name=work_pool,
        print_next_steps=False,
        description="One strategy at one label budget of a comparison (compare.work_pool).",
        tags=["comparison"],
    )
    return f"{train_comparison_cell.name}/{work_pool}"
