"""Figures 8-10 of the bench: resume after a kill, comparison workers, and memory over a grid.

Each uses the bench's MLflow store (MLFLOW_TRACKING_URI, set by bench.py) and experiments and
feature caches of its own, so nothing is resumed from another figure's runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPARE_CONFIG = ROOT / "conf" / "compare.yaml"
TRANSFERFLOW = str(Path(sys.executable).with_name("transferflow"))


def _client():
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def _stage_runs(experiment: str) -> dict[str, list]:
    """Stage runs of an experiment's parent runs, by parent run id (oldest parent first)."""
    client = _client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [run.info.run_id for run in runs if "mlflow.parentRunId" not in run.data.tags]
    return {
        parent: [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent]
        for parent in parents
    }


def resume_after_kill(config: str, overrides: list[str], work: Path) -> tuple[int, int, float]:
    """8. `kill -9` of `transferflow train` during its last stage, then the same command again.

    Returns the stages the rerun trained besides the killed one, the stages it resumed, and the
    rerun's wall time. The process group is killed, so Prefect's temporary server goes with it.
    """
    experiment = "bench-resume"
    settings = [*overrides, f"tracking.experiment={experiment}", "registry.model_name=bench-resume"]
    command = [TRANSFERFLOW, "train", "-c", config]
    for setting in settings:
        command += ["-s", setting]
    from tasks.stages.preflight import load_and_check

    stages = ["feature_extraction"] + [
        f"fine_tune_{n}" for n in range(1, len(load_and_check(config).config.fine_tune.stages) + 1)
    ]
    before_last = stages[-2]
    with (work / "resume-killed.log").open("wb") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 1800  # the demo config's stages take about a minute
        try:
            while process.poll() is None and time.monotonic() < deadline:
                finished = [
                    run.data.tags["stage"]
                    for runs in _stage_runs(experiment).values()
                    for run in runs
                    if run.data.tags.get("checkpoint") == "saved"
                ]
                if before_last in finished:
                    break
                time.sleep(0.5)
            if process.poll() is not None or time.monotonic() >= deadline:
                raise RuntimeError(f"the run never reached its last stage; see {log.name}")
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    rerun = list(_stage_runs(experiment).values())[-1]
    trained = [run for run in rerun if run.data.tags.get("checkpoint") == "saved"]
    resumed = [run for run in rerun if "resumed_from_run_id" in run.data.tags]
    return len(trained) - 1, len(resumed), seconds


def _transfer_strategies(stage_epochs: int | None = None) -> list[dict]:
    from tasks.stages.preflight import load_and_check

    declared = load_and_check(str(COMPARE_CONFIG)).config.compare.strategies
    chosen = []
    for strategy in declared:
        if strategy.from_scratch:
            continue
        tree = strategy.model_dump(mode="json", exclude_unset=True)
        if stage_epochs is not None:
            for stage in tree.get("fine_tune", {}).get("stages", []):
                stage["epochs"] = stage_epochs
        chosen.append(tree)
    return chosen


def compare_with_workers(work: Path, workers: int, budgets: list[int]) -> tuple[float, float]:
    """9. The transfer strategies at `budgets` with `workers` local worker processes.

    Returns the comparison's wall time and the sum of its cells' own times (their MLflow runs).
    Each call has an experiment and a feature cache of its own: nothing is resumed or reused.
    """
    from flows.compare import compare_strategies

    name = f"bench-workers-{workers}"
    started = time.perf_counter()
    result = compare_strategies(
        str(COMPARE_CONFIG),
        [
            f"compare.strategies={json.dumps(_transfer_strategies())}",
            f"compare.label_budgets={json.dumps(budgets)}",
            f"compare.workers={workers}",
            "compare.seeds=null",
            f"feature_extraction.cache_dir={work / name}",
            f"registry.model_name={name}",
            f"tracking.experiment={name}",
        ],
    )
    wall = time.perf_counter() - started
    client = _client()
    cells = [client.get_run(run_id).info for run_id in result.runs["run_id"]]
    return wall, sum((info.end_time - info.start_time) / 1000 for info in cells)


def grid_memory(work: Path, budgets: list[int], workers: int) -> tuple[float, float, int]:
    """10. `transferflow compare` over a grid of 5 strategies x len(budgets) cells, at 32 px.

    Returns the largest peak RSS of any process of the run (the command, its workers, Prefect's
    temporary server: all its waited-for descendants), the most any worker's peak grew from its
    first cell to its last, and the number of cells.
    """
    experiment = "bench-grid"
    settings = [
        f"compare.strategies={json.dumps(_transfer_strategies(stage_epochs=1))}",
        f"compare.label_budgets={json.dumps(budgets)}",
        f"compare.workers={workers}",
        "compare.seeds=null",
        "data.image_size=32",
        "feature_extraction.epochs=10",
        f"feature_extraction.cache_dir={work / experiment}",
        f"registry.model_name={experiment}",
        f"tracking.experiment={experiment}",
    ]
    command = [TRANSFERFLOW, "compare", "-c", str(COMPARE_CONFIG)]
    for setting in settings:
        command += ["-s", setting]
    # A fresh parent, so the figure counts this command's process tree and no earlier figure's.
    # Linux reports ru_maxrss in KB: the largest of the waited-for descendants.
    measure = (
        "import resource, subprocess, sys; "
        "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run(
        [sys.executable, "-c", measure, *command],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    largest = int(done.stdout.split()[-1]) / 1024
    client = _client()
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    cells = client.search_runs(
        [found.experiment_id], "tags.worker != ''", order_by=["attributes.start_time ASC"]
    )
    by_worker: dict[str, list[float]] = {}
    for cell in cells:
        by_worker.setdefault(cell.data.tags["worker"], []).append(
            cell.data.metrics["worker_peak_rss_mb"]
        )
    growth = max(peaks[-1] - peaks[0] for peaks in by_worker.values())
    return largest, growth, len(cells)
