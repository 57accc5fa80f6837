"""The edges of Prefect's run graph for a flow's newest run: how many, and which task feeds which.

An edge is what the Prefect UI draws from one task run to another: the later one's inputs held
the earlier one's result (or a part of it), or it waited for it. Run after `make train`:

    python bench/run_graph.py                 # train-classifier, the newest run
    python bench/run_graph.py compare-strategies --edges

It reads the flow run through Prefect's API: PREFECT_API_URL's server, else the local one.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flow", nargs="?", default="train-classifier", help="the flow's name")
    parser.add_argument("--edges", action="store_true", help="list every edge")
    args = parser.parse_args()
    # A temporary local server would otherwise try to send usage data, offline or not.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[args.flow])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
        if not runs:
            raise SystemExit(f"no run of the flow {args.flow!r} on this Prefect server")
        run = runs[0]
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        )
    names = {task.id: task.name for task in tasks}
    edges = {
        (upstream.id, task.id)
        for task in tasks
        for inputs in task.task_inputs.values()
        for upstream in inputs
        if getattr(upstream, "input_type", None) == "task_run" and upstream.id in names
    }
    print(f"flow run {run.name} ({run.start_time}): {len(tasks)} task runs, {len(edges)} edges")
    for name, count in Counter(names[upstream] for upstream, _ in edges).most_common():
        print(f"  {name:<50} feeds {count}")
    if args.edges:
        for upstream, downstream in sorted(edges, key=lambda e: (names[e[0]], names[e[1]])):
            print(f"  {names[upstream]} -> {names[downstream]}")


if __name__ == "__main__":
    main()
