"""The strategy comparison: strategies from conf, label budgets, and the real flow end to end."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from conf import LoadedConfig, load_config
from tasks.comparison.cells import cell_id
from tasks.comparison.strategies import (
    LabelBudgetError,
    NoStrategiesError,
    keep_labels_per_class,
    resolve_strategies,
    stages_on_same_base,
)
from tasks.comparison.table import COLUMNS, RUN_COLUMNS
from tasks.data.table import ImageTable
from tests.conftest import HAVE_IMAGENET_WEIGHTS
from tests.servers import fresh_name

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


# --- strategies and label budgets ----------------------------------------------------------------


def image_table(train_per_class: int) -> ImageTable:
    rows = [
        (f"/data/{split}/{label}/{i:03d}.png", label, split)
        for label in ("bag", "coat", "shirt")
        for split, count in (("train", train_per_class), ("val", 3), ("test", 4))
        for i in range(count)
    ]
    return ImageTable(
        pd.DataFrame(rows, columns=["path", "label", "split"]), ("bag", "coat", "shirt")
    )


def train_paths(table: ImageTable, label: str) -> set[str]:
    train = table.split("train")
    return set(train.loc[train["label"] == label, "path"])


def test_label_budget_keeps_that_many_per_class_and_smaller_budgets_are_subsets() -> None:
    table = image_table(train_per_class=30)
    small, large = (keep_labels_per_class(table, budget, seed=42) for budget in (5, 20))
    for label in table.classes:
        assert len(train_paths(small, label)) == 5 and len(train_paths(large, label)) == 20
        assert train_paths(small, label) < train_paths(large, label)
    assert small.split("val").equals(table.split("val"))
    assert small.split("test").equals(table.split("test"))
    again = keep_labels_per_class(table, 5, seed=42)
    assert again.frame.equals(small.frame)
    other_seed = keep_labels_per_class(table, 5, seed=7)
    assert not other_seed.frame.equals(small.frame)


def test_label_budget_larger_than_the_data_says_how_to_get_more() -> None:
    with pytest.raises(LabelBudgetError) as error:
        keep_labels_per_class(image_table(train_per_class=10), 25, seed=42)
    message = str(error.value)
    assert "25 per class" in message and "bag 10" in message
    assert "demo.train_per_class=25" in message


def test_compare_config_resolves_every_strategy() -> None:
    loaded = LoadedConfig(load_config(CONF / "compare.yaml"), ROOT)
    strategies = {s.name: s for s in resolve_strategies(loaded)}
    assert list(strategies) == ["feature_extraction", "fine_tune_1", "fine_tune_2", "full_unfreeze"]
    assert strategies["feature_extraction"].loaded.config.fine_tune.stages == []
    stages = strategies["fine_tune_2"].loaded.config.fine_tune.stages
    assert [s.unfreeze_blocks for s in stages] == [2, 4]
    assert loaded.config.compare.seeds == [1, 2, 3]
    for strategy in strategies.values():
        assert strategy.loaded.config.data == loaded.config.data
        assert strategy.loaded.config.seed == loaded.config.seed


def test_from_scratch_trains_as_long_as_the_longest_transfer_strategy() -> None:
    scratch = {"name": "from_scratch", "from_scratch": True}
    deepest = {
        "name": "ft",
        "fine_tune": {"stages": [{"unfreeze_blocks": b, "epochs": 4} for b in (2, 4, 8)]},
    }
    overrides = [f"compare.strategies={json.dumps([scratch, deepest])}"]
    loaded = LoadedConfig(load_config(CONF / "compare.yaml", overrides), ROOT)
    strategies = {s.name: s for s in resolve_strategies(loaded)}
    found = strategies["from_scratch"]
    assert found.loaded.config.base.weights is None
    assert found.loaded.config.base.options == {"alpha": 0.25}
    # The head's epochs plus three 4-epoch stages, at the head's learning rate.
    assert found.from_scratch and len(found.stages) == 1
    (only,) = found.stages
    assert only.params() == {
        "unfreeze_blocks": "all",
        "epochs": loaded.config.feature_extraction.epochs + 12,
        "learning_rate": loaded.config.feature_extraction.learning_rate,
    }


def test_default_config_declares_no_strategies() -> None:
    loaded = LoadedConfig(load_config(CONF / "default.yaml"), ROOT)
    with pytest.raises(NoStrategiesError, match=r"conf/compare\.yaml"):
        resolve_strategies(loaded)


def test_compare_section_leaves_training_params_alone() -> None:
    plain = load_config(CONF / "default.yaml")
    declared = load_config(
        CONF / "default.yaml",
        ["compare.label_budgets=[5]", "compare.strategies=[{name: fe, fine_tune: {stages: []}}]"],
    )
    assert declared.compare.label_budgets == [5]
    assert declared.model_dump() == plain.model_dump()


def test_from_scratch_batch_norm_statistics_are_measured_not_left_at_their_start() -> None:
    import keras
    import numpy as np

    from tasks.model.batch_norm import measure_batch_norm_statistics

    inputs = keras.Input((4, 4, 3))
    trained = keras.layers.BatchNormalization(name="trained")(inputs)
    frozen_layer = keras.layers.BatchNormalization(name="frozen")
    frozen_layer.trainable = False
    model = keras.Model(inputs, frozen_layer(trained))
    images = np.random.default_rng(0).normal(5.0, 3.0, (64, 4, 4, 3)).astype("float32")

    measure_batch_norm_statistics(model, images)

    layer = model.get_layer("trained")
    assert np.allclose(layer.moving_mean.numpy(), images.mean(axis=(0, 1, 2)), atol=1e-3)
    assert np.allclose(layer.moving_variance.numpy(), images.var(axis=(0, 1, 2)), rtol=1e-3)
    assert layer.momentum == 0.99  # restored for training
    assert np.allclose(frozen_layer.moving_mean.numpy(), 0.0)
    assert np.allclose(frozen_layer.moving_variance.numpy(), 1.0)


# --- the flow end to end -------------------------------------------------------------------------

BUDGETS = [2, 4]
SEEDS = [1, 2]
STRATEGIES = ["from_scratch", "feature_extraction", "fine_tune_1"]
STAGES = {
    "from_scratch": {"from_scratch"},
    "feature_extraction": {"feature_extraction"},
    "fine_tune_1": {"feature_extraction", "fine_tune_1"},
}
# The demo comparison shrunk: 32 px, two short stages, three strategies, two budgets, two seeds.
SHRUNK = {
    "extends": "compare.yaml",
    "data": {"image_size": 32, "batch_size": 32, "dvc_file": None},
    "feature_extraction": {"epochs": 3, "patience": 2},
    "compare": {
        "label_budgets": BUDGETS,
        "seeds": SEEDS,
        "workers": 1,  # one worker process at a time; a test below runs two
        "cells_per_worker": 8,  # fewer than the 12 cells, so a worker is replaced
        # TensorFlow sums in an order set by its thread count: the same count for one worker
        # and for two, so that their tables match exactly.
        "threads_per_worker": 1,
        "strategies": [
            {"name": "from_scratch", "from_scratch": True},
            {"name": "feature_extraction", "fine_tune": {"stages": []}},
            {"name": "fine_tune_1", "fine_tune": {"stages": [{"unfreeze_blocks": 2, "epochs": 1}]}},
        ],
    },
    "registry": {"min_value": 0.0},
}


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tracking_server: str, prefect_api: str):
    """One real comparison in a project of its own (plain data folder) on the run's servers.

    The model and experiment names are the comparison's own: the servers are shared by the run.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.compare import compare_strategies
    from tasks.data.demo import write_demo_dataset

    project = tmp_path_factory.mktemp("compare") / "project"
    shutil.copytree(CONF, project / "conf", ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    name = fresh_name("compare")
    config = SHRUNK | {
        "registry": SHRUNK["registry"] | {"model_name": name},
        "tracking": {"experiment": name},
    }
    (project / "conf" / "test.yaml").write_text(yaml.safe_dump(config))
    write_demo_dataset(
        project / "data" / "fashion_mnist",
        train_per_class=6,
        val_per_class=2,
        test_per_class=5,
        seed=0,
    )
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    overrides = [] if HAVE_IMAGENET_WEIGHTS else ["base.weights=null"]
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_URI", tracking_server)
            # For the thread that forwards the workers' logs, which reads no temporary settings.
            patch.setenv("PREFECT_API_URL", prefect_api)
            result = compare_strategies(str(project / "conf" / "test.yaml"), overrides)
        assert result.tracking_uri == tracking_server
        yield project, result


def comparison_runs(result, kind: str | None = None) -> list:
    """The comparison's runs: each seed's cell runs (`kind` None) or its `cell-summary` runs."""
    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs(
        [result.experiment_id], f"tags.comparison_id = '{result.comparison_id}'"
    )
    return [
        run
        for run in runs
        if "strategy" in run.data.tags and run.data.tags.get("comparison") == kind
    ]


def strategy_runs(result) -> list:
    return comparison_runs(result)


@pytest.mark.slow
def test_one_parent_run_per_strategy_and_budget_with_nested_stages(compared) -> None:
    _, result = compared
    client = MlflowClient(result.tracking_uri)
    parents = strategy_runs(result)
    found = sorted(
        (run.data.tags["strategy"], int(run.data.tags["label_budget"]), int(run.data.tags["seed"]))
        for run in parents
    )
    assert found == sorted(itertools.product(STRATEGIES, BUDGETS, SEEDS))
    for parent in parents:
        assert parent.info.status == "FINISHED"
        assert "mlflow.parentRunId" not in parent.data.tags
        assert parent.data.tags["data_version"] == result.data_version
        budget = int(parent.data.tags["label_budget"])
        assert parent.data.metrics["labels_per_class"] == budget
        assert {"test_accuracy", "test_macro_f1", "trainable_params", "training_seconds"} <= set(
            parent.data.metrics
        )
        dataset = parent.inputs.dataset_inputs[0].dataset
        # Budget per class times ten classes, plus the whole validation and test splits.
        assert json.loads(dataset.profile)["num_rows"] == 10 * budget + 10 * 2 + 10 * 5
        children = client.search_runs(
            [result.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
        assert {child.data.tags["stage"] for child in children} == STAGES[
            parent.data.tags["strategy"]
        ]

    scratch = next(p for p in parents if p.data.tags["strategy"] == "from_scratch")
    assert scratch.data.params["seed"] == scratch.data.tags["seed"]
    assert scratch.data.params["base.weights"] == "None"
    scratch_stage = client.search_runs(
        [result.experiment_id], f"tags.mlflow.parentRunId = '{scratch.info.run_id}'"
    )[0]
    assert scratch_stage.data.params["epochs"] == "4"  # the head's 3 epochs plus fine_tune_1's 1
    head_only = next(p for p in parents if p.data.tags["strategy"] == "feature_extraction")
    assert (
        scratch.data.metrics["trainable_params"] > 50 * head_only.data.metrics["trainable_params"]
    )


@pytest.mark.slow
def test_strategies_on_one_base_share_the_cached_features(compared) -> None:
    project, _ = compared
    cached = list((project / ".cache" / "features").glob("*.features.npy"))
    # Each seed draws its own training images, but all cells read one entry for the training
    # images any seed draws, and one each for validation and test. A base with random weights
    # (no ImageNet file here) is drawn per seed, and so are its features.
    assert len(cached) == 3 * (1 if HAVE_IMAGENET_WEIGHTS else len(SEEDS))


@pytest.mark.slow
def test_a_strategy_starts_from_the_stages_an_earlier_one_trained(compared) -> None:
    _, result = compared
    client = MlflowClient(result.tracking_uri)
    for budget, seed in itertools.product(BUDGETS, SEEDS):
        parents = {
            run.data.tags["strategy"]: run
            for run in strategy_runs(result)
            if run.data.tags["label_budget"] == str(budget) and run.data.tags["seed"] == str(seed)
        }
        stages = {
            name: {
                child.data.tags["stage"]: child
                for child in client.search_runs(
                    [result.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
                )
            }
            for name, run in parents.items()
        }
        trained = stages["feature_extraction"]["feature_extraction"]
        reused = stages["fine_tune_1"]["feature_extraction"]
        assert "resumed_from_run_id" not in trained.data.tags
        assert reused.data.tags["resumed_from_run_id"] == trained.info.run_id
        assert reused.data.metrics["test_accuracy"] == trained.data.metrics["test_accuracy"]
        assert reused.data.params == trained.data.params
        assert not client.search_logged_models(
            [result.experiment_id], f"source_run_id = '{reused.info.run_id}'"
        )
        fine_tuned = stages["fine_tune_1"]["fine_tune_1"]
        assert "resumed_from_run_id" not in fine_tuned.data.tags
        # Fine-tuning continues the resumed head's step count: one curve across the stages.
        head_steps = [m.step for m in client.get_metric_history(reused.info.run_id, "val_loss")]
        tuned_steps = [
            m.step for m in client.get_metric_history(fine_tuned.info.run_id, "val_loss")
        ]
        assert head_steps == list(range(int(trained.data.metrics["epochs_run"])))
        assert tuned_steps[0] == len(head_steps)
        assert client.search_logged_models(
            [result.experiment_id], f"source_run_id = '{fine_tuned.info.run_id}'"
        )


@pytest.mark.slow
def test_comparison_table_is_an_mlflow_and_prefect_artifact_with_charts(compared) -> None:
    project, result = compared
    assert list(result.table.columns) == list(COLUMNS)
    assert len(result.table) == len(STRATEGIES) * len(BUDGETS)
    assert (result.table["seeds"] == len(SEEDS)).all()
    assert list(result.runs.columns) == list(RUN_COLUMNS)
    assert len(result.runs) == len(STRATEGIES) * len(BUDGETS) * len(SEEDS)
    assert set(result.runs["run_id"]) == {run.info.run_id for run in strategy_runs(result)}

    client = MlflowClient(result.tracking_uri)
    summary = client.get_run(result.run_id)
    assert summary.data.tags["comparison_id"] == result.comparison_id
    assert summary.data.tags["best_strategy"] == result.best_strategy
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"comparison.csv", "comparison_runs.csv", "comparison.png", "data_efficiency.png"} <= (
        artifacts
    )
    local = client.download_artifacts(result.run_id, "comparison.csv", str(project / "downloaded"))
    logged = pd.read_csv(local)
    assert len(logged) == len(result.table) and list(logged.columns) == list(COLUMNS)

    for path in (
        result.files.table,
        result.files.runs,
        result.files.chart,
        result.files.data_efficiency,
    ):
        assert path.parent == project / "reports" and path.stat().st_size > 0
    assert result.files.chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.files.data_efficiency.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from prefect import get_client

    async def latest():
        async with get_client() as prefect:
            return await prefect.read_latest_artifacts()

    tables = [a for a in asyncio.run(latest()) if a.key == "strategy-comparison"]
    assert tables, "the flow published no strategy-comparison table artifact"
    rows = json.loads(tables[0].data)  # Prefect stores a table artifact as JSON text
    assert len(rows) == len(STRATEGIES) * len(BUDGETS)
    assert {row["strategy"] for row in rows} == set(STRATEGIES)
    assert all(row["test_accuracy_ci_low"] <= row["test_accuracy_mean"] for row in rows)


@pytest.mark.slow
def test_each_strategy_and_budget_has_a_run_with_its_mean_and_interval_over_the_seeds(
    compared,
) -> None:
    from scipy import stats

    _, result = compared
    seed_runs = {run.info.run_id: run for run in strategy_runs(result)}
    summaries = comparison_runs(result, "cell-summary")
    assert sorted(
        (run.data.tags["strategy"], int(run.data.tags["label_budget"])) for run in summaries
    ) == sorted(itertools.product(STRATEGIES, BUDGETS))
    for summary in summaries:
        tags, metrics = summary.data.tags, summary.data.metrics
        assert summary.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == result.run_id
        assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.note.content"].startswith(
            f"{tags['strategy']} at {tags['label_budget']} labels per class: mean"
        )
        runs = [seed_runs[run_id] for run_id in tags["seed_run_ids"].split(",")]
        assert sorted(int(run.data.tags["seed"]) for run in runs) == SEEDS
        assert {run.data.tags["strategy"] for run in runs} == {tags["strategy"]}
        assert {run.data.tags["label_budget"] for run in runs} == {tags["label_budget"]}
        for metric in ("test_accuracy", "test_macro_f1"):
            scores = [run.data.metrics[metric] for run in runs]
            assert metrics[f"{metric}_mean"] == pytest.approx(np.mean(scores))
            assert metrics[f"{metric}_std"] == pytest.approx(np.std(scores, ddof=1))
            if np.std(scores) > 0:
                low, high = stats.t.interval(
                    0.95, df=1, loc=np.mean(scores), scale=stats.sem(scores)
                )
            else:
                low = high = scores[0]
            assert metrics[f"{metric}_ci_low"] == pytest.approx(low)
            assert metrics[f"{metric}_ci_high"] == pytest.approx(high)
        assert metrics["seeds"] == len(SEEDS)
        assert tags["interval"] == "95% t over 2 seeds"
        row = result.table.set_index(["strategy", "labels_per_class"]).loc[
            (tags["strategy"], int(tags["label_budget"]))
        ]
        assert row["test_accuracy_mean"] == pytest.approx(metrics["test_accuracy_mean"])
        assert tags["within_best"] == str(bool(row["within_best"])).lower()


@pytest.mark.slow
def test_best_strategy_is_registered_through_the_gate(compared) -> None:
    _, result = compared
    table = result.table
    largest = table[table["labels_per_class"] == max(BUDGETS)]
    best = largest.loc[largest["test_accuracy_mean"].idxmax()]
    assert best["within_best"]
    rivals = largest[largest["within_best"]].sort_values(["trainable_params", "training_seconds"])
    assert result.best_strategy == rivals.iloc[0]["strategy"]
    winner_run = result.runs[result.runs["run_id"] == result.best_run_id].iloc[0]
    assert winner_run["strategy"] == result.best_strategy
    assert winner_run["labels_per_class"] == max(BUDGETS)
    assert result.winner_reason.startswith(f"{result.best_strategy}: accuracy ")

    client = MlflowClient(result.tracking_uri)
    version = client.get_model_version(result.model_name, result.version)
    assert version.tags["run_id"] == result.best_run_id
    assert version.tags["comparison.winner_reason"] == result.winner_reason
    assert version.tags["seed"] == str(winner_run["seed"])
    stage_run = client.get_run(version.run_id)  # the winner's final stage, which logged the model
    assert stage_run.data.tags["mlflow.parentRunId"] == result.best_run_id
    assert version.tags["promotion.decision"] == "promoted", result.decision.reason
    champion = client.get_model_version_by_alias(result.model_name, "champion")
    assert str(champion.version) == result.version == "1"
    summary_tags = client.get_run(result.run_id).data.tags
    assert summary_tags["promotion.decision"] == "promoted"
    assert summary_tags["winner_reason"] == result.winner_reason


@pytest.mark.slow
def test_prefect_names_the_comparison_and_each_cell(compared) -> None:
    """In the Prefect UI: which model on which data the comparison ran, and a task run per cell."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        TaskRunFilter,
        TaskRunFilterName,
    )

    project, result = compared
    cells = [
        f"train-cell[{cell_id(strategy, budget, seed)}]"
        for strategy, budget, seed in itertools.product(STRATEGIES, BUDGETS, SEEDS)
    ]

    async def read_back():
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["compare-strategies"]))
            )
            tasks = await client.read_task_runs(
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=cells))
            )
        return runs, {task.name for task in tasks}

    runs, task_names = asyncio.run(read_back())
    config = str(project / "conf" / "test.yaml")
    (run,) = [
        run
        for run in runs
        if run.parameters["config_path"] == config
        and run.parameters["overrides"] == ([] if HAVE_IMAGENET_WEIGHTS else ["base.weights=null"])
    ]
    short = result.data_version.removeprefix("files-")[:8]  # plain files: a fingerprint, no DVC
    assert run.name == f"compare {result.model_name} @{short}"
    assert {f"model:{result.model_name}", f"data:{short}"} <= set(run.tags)
    assert {f"strategy:{strategy}" for strategy in STRATEGIES} <= set(run.tags)
    assert task_names == set(cells)


@pytest.mark.slow
def test_a_reused_stage_ends_where_training_it_again_would(compared, tracking_server, prefect_api):
    """fine_tune_1 alone, trained from the start in a worker of its own, scores what it scored
    when it resumed feature_extraction's checkpoint from another worker."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.compare import compare_strategies

    project, result = compared
    strategy = SHRUNK["compare"]["strategies"][2]
    budget = max(BUDGETS)
    overrides = [
        f"compare.strategies=[{json.dumps(strategy)}]",
        f"compare.label_budgets=[{budget}]",
        f"compare.seeds=[{SEEDS[0]}]",
        f"feature_extraction.cache_dir={project / '.cache' / 'alone'}",
        f"registry.model_name={result.model_name}-alone",
        "tracking.resume=false",
    ]
    if not HAVE_IMAGENET_WEIGHTS:
        overrides.append("base.weights=null")
    with (
        temporary_settings(updates={PREFECT_API_URL: prefect_api}),
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setenv("MLFLOW_TRACKING_URI", tracking_server)
        patch.setenv("PREFECT_API_URL", prefect_api)
        alone = compare_strategies(str(project / "conf" / "test.yaml"), overrides)
    together = result.runs.set_index(["strategy", "labels_per_class", "seed"])
    row = together.loc[("fine_tune_1", budget, SEEDS[0])]
    (lone,) = alone.runs.itertuples()
    assert (lone.test_accuracy, lone.test_macro_f1) == (row["test_accuracy"], row["test_macro_f1"])
    assert lone.epochs == row["epochs"]
    client = MlflowClient(tracking_server)
    stages = client.search_runs([alone.experiment_id], f"tags.mlflow.parentRunId = '{lone.run_id}'")
    assert len(stages) == 2 and not any("resumed_from_run_id" in s.data.tags for s in stages)


def cell_runs_by_worker(result) -> dict[str, list]:
    workers: dict[str, list] = {}
    for run in strategy_runs(result):
        workers.setdefault(run.data.tags["worker"], []).append(run)
    return workers


def scores(table: pd.DataFrame) -> pd.DataFrame:
    """What must not depend on where or alongside what a cell trained."""
    kept = ["strategy", "labels_per_class", "seed", "test_accuracy", "test_macro_f1", "epochs"]
    order = ["strategy", "labels_per_class", "seed"]
    return table[kept].sort_values(order).reset_index(drop=True)


def compare_again(project: Path, result, prefect_api: str, suffix: str, *overrides: str):
    """The same comparison under an experiment and model of its own (so nothing is resumed)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.compare import compare_strategies

    settings = [
        f"tracking.experiment={result.model_name}-{suffix}",
        f"registry.model_name={result.model_name}-{suffix}",
        *overrides,
    ]
    if not HAVE_IMAGENET_WEIGHTS:
        settings.append("base.weights=null")
    with (
        temporary_settings(updates={PREFECT_API_URL: prefect_api}),
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setenv("MLFLOW_TRACKING_URI", result.tracking_uri)
        patch.setenv("PREFECT_API_URL", prefect_api)
        return compare_strategies(str(project / "conf" / "test.yaml"), settings)


@pytest.mark.slow
def test_cells_train_in_worker_processes_and_two_workers_give_the_same_table(
    compared, prefect_api
) -> None:
    import os

    project, one = compared
    # One worker at a time, replaced after compare.cells_per_worker cells; never this process.
    per_worker = SHRUNK["compare"]["cells_per_worker"]
    by_worker = cell_runs_by_worker(one)
    full, rest = divmod(sum(len(runs) for runs in by_worker.values()), per_worker)
    expected = sorted([per_worker] * full + ([rest] if rest else []))
    assert sorted(len(runs) for runs in by_worker.values()) == expected, sorted(by_worker)
    assert not any(worker.endswith(f":{os.getpid()}") for worker in by_worker)
    seed = SEEDS[0]
    two = compare_again(
        project, one, prefect_api, "two-workers", "compare.workers=2", f"compare.seeds=[{seed}]"
    )
    workers = cell_runs_by_worker(two)
    assert len(workers) >= 2 and all(len(runs) <= per_worker for runs in workers.values()), workers
    pd.testing.assert_frame_equal(scores(two.runs), scores(one.runs[one.runs["seed"] == seed]))
    for runs in workers.values():
        assert all(run.data.metrics["worker_peak_rss_mb"] > 100 for run in runs)


@pytest.mark.slow
def test_cells_run_on_a_work_pool_with_two_process_workers(compared, prefect_api, tmp_path):
    """The deployment `transferflow deploy-cells` registers, served by two `prefect worker`s."""
    import os

    from tests.repositories import run
    from tests.servers import BIN, start, stop, tail

    project, one = compared
    pool = fresh_name("cells")[:40]
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "MLFLOW_TRACKING_URI": one.tracking_uri,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    run(str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process", cwd=ROOT, env=env)
    deployed = run(str(BIN / "transferflow"), "deploy-cells", "--pool", pool, cwd=ROOT, env=env)
    assert f"train-comparison-cell/{pool}" in deployed
    logs = [tmp_path / f"worker-{index}.log" for index in range(2)]
    # One flow run at a time each, so two cells ready together go to both workers.
    command = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "1"]
    workers = [start([*command, "--name", log.stem], log, env) for log in logs]
    budget = max(BUDGETS)
    try:
        pooled = compare_again(
            project,
            one,
            prefect_api,
            "work-pool",
            f"compare.work_pool={pool}",
            "compare.workers=2",
            f"compare.label_budgets=[{budget}]",
            f"compare.seeds=[{SEEDS[0]}]",
        )
    finally:
        for worker in workers:
            stop(worker)
    local = one.runs[(one.runs["labels_per_class"] == budget) & (one.runs["seed"] == SEEDS[0])]
    pd.testing.assert_frame_equal(scores(pooled.runs), scores(local))
    assert len(cell_runs_by_worker(pooled)) == len(STRATEGIES)  # a flow-run process per cell
    for log in logs:
        assert "Completed" in tail(log, 100_000), f"{log.name} ran no cell:\n{tail(log)}"


def test_only_strategies_on_the_same_frozen_base_share_their_cuts() -> None:
    """The feature pass of one strategy fills the activation caches of the others' cuts only
    where their frozen base computes the same activations."""
    declared = [
        {"name": "fe", "fine_tune": {"stages": []}},
        {"name": "ft", "fine_tune": {"stages": [{"unfreeze_blocks": 2, "epochs": 1}]}},
        {"name": "scratch", "from_scratch": True},
        {
            "name": "v2",
            "base": {"architecture": "MobileNetV2", "weights": None, "options": {}},
            "fine_tune": {"stages": [{"unfreeze_blocks": 2, "epochs": 1}]},
        },
    ]
    overrides = [f"compare.strategies={json.dumps(declared)}"]
    loaded = LoadedConfig(load_config(CONF / "compare.yaml", overrides), ROOT)
    strategies = resolve_strategies(loaded)
    found = {s.name: s for s in strategies}
    shared = stages_on_same_base(strategies, found["fe"])
    assert [stage.name for stage in shared] == ["feature_extraction", "fine_tune_1"]
    assert shared[1] is found["ft"].stages[1]
    assert stages_on_same_base(strategies, found["scratch"]) == ()
    assert [stage.name for stage in stages_on_same_base(strategies, found["v2"])] == []
