"""What runs are called in Prefect: flow runs by what they train on which data, task runs by stage.

Left alone, Prefect names flow runs at random (`crafty-fox`) and task runs by a counter
(`log-stage-905`), so the UI cannot tell one stage or one model from another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from tasks.runtime.run_log import run_logger

TaskT = TypeVar("TaskT", bound=Task[Any, Any])


@dataclass(frozen=True)
class FlowRunLabels:
    """A flow run's name, e.g. `train fashion-mnist-mobilenet @ec1d3b02`, and its tags."""

    name: str
    tags: tuple[str, ...]


def short_version(data_version: str) -> str:
    """The first 8 characters of a data version's hash, as git shows a commit."""
    return data_version.removeprefix("files-")[:8]


def flow_run_labels(
    action: str, model_name: str, data_version: str, strategies: Sequence[str]
) -> FlowRunLabels:
    short = short_version(data_version)
    return FlowRunLabels(
        name=f"{action} {model_name} @{short}",
        tags=(f"model:{model_name}", f"data:{short}", *(f"strategy:{s}" for s in strategies)),
    )


def for_stage(step: TaskT, stage: str) -> TaskT:
    """`step` with its task run named after the stage, e.g. `log-stage[fine_tune_2]`."""
    # Prefect formats the name with the task's parameters: braces in a stage name stay literal.
    shown = stage.replace("{", "{{").replace("}", "}}")
    return step.with_options(task_run_name=f"{step.name}[{shown}]")  # type: ignore[return-value]


@task(name="label-flow-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def label_flow_run(
    action: str, model_name: str, data_version: str, strategies: Sequence[str]
) -> FlowRunLabels:
    """Rename the flow run in progress after what it does and tag it, once its data is known.

    Tags already on the run (a deployment's, a caller's `prefect.tags`) are kept.
    """
    from uuid import UUID

    from prefect import get_client
    from prefect.runtime import flow_run

    labels = flow_run_labels(action, model_name, data_version, strategies)
    run_id = flow_run.get_id()
    if run_id is None:
        return labels
    with get_client(sync_client=True) as client:
        kept = client.read_flow_run(UUID(run_id)).tags or []
        tags = [*kept, *(tag for tag in labels.tags if tag not in kept)]
        client.update_flow_run(UUID(run_id), name=labels.name, tags=tags)
    # The terminal's log lines keep the name the run started with; this one links the two.
    run_logger().info("This flow run is now named %r in the Prefect UI", labels.name)
    return labels
