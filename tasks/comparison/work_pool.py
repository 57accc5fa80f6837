"""Cells on a Prefect work pool: each one a flow run of the train-comparison-cell deployment."""

from __future__ import annotations

from mlflow import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun

from conf.errors import ExpectedError
from tasks.comparison.cells import CellSpec

CELL_FLOW = "train-comparison-cell"


class DataVersionChangedError(ExpectedError, RuntimeError):
    """A worker found another data version than the comparison it works for."""


def find_cell_run(uri: str, experiment_id: str, cell: CellSpec) -> str:
    """The MLflow parent run a cell finished (for cells run elsewhere, e.g. on a work pool)."""
    runs = MlflowClient(uri).search_runs(
        [experiment_id],
        f"tags.comparison_id = '{cell.comparison_id}' and tags.strategy = '{cell.strategy}' "
        f"and tags.label_budget = '{cell.labels_per_class}' and tags.seed = '{cell.seed}' "
        "and attributes.status = 'FINISHED'",
        max_results=1,
    )
    if not runs:
        raise RuntimeError(
            f"cell {cell.id} finished but left no finished MLflow run in experiment "
            f"{experiment_id}; does the worker use the same MLFLOW_TRACKING_URI?"
        )
    return runs[0].info.run_id


@task(
    name="train-cell-on-work-pool",
    task_run_name="train-cell-on-work-pool[{cell.id}]",
    cache_policy=NO_CACHE,
)
def train_cell_on_pool(
    cell: CellSpec, work_pool: str, uri: str, experiment_id: str, timeout_minutes: int
) -> str:
    """One cell as a flow run of the `train-comparison-cell/<work_pool>` deployment."""
    from prefect.deployments import run_deployment

    flow_run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync in a sync task
        f"{CELL_FLOW}/{work_pool}",
        parameters={"cell": cell.model_dump(mode="json")},
        timeout=timeout_minutes * 60,
        tags=[
            f"strategy:{cell.strategy}",
            f"labels-per-class:{cell.labels_per_class}",
            f"seed:{cell.seed}",
        ],
    )
    state = flow_run.state
    if state is None or not state.is_completed():
        shown = state.name if state is not None else "no state"
        raise RuntimeError(
            f"cell {cell.id} ended {shown} on work pool {work_pool!r} (flow run {flow_run.id})"
        )
    return find_cell_run(uri, experiment_id, cell)


@task(name="check-data-version", cache_policy=NO_CACHE)
def check_cell_data(cell: CellSpec, data_version: str) -> None:
    """Stop a worker whose checkout pins other data than the comparison it works for."""
    if data_version != cell.data_version:
        raise DataVersionChangedError(
            f"this worker's data is version {data_version}, the comparison's is "
            f"{cell.data_version}: check out the same commit of data.dvc on every worker"
        )
