"""Benchmark the pipeline against the limits of this machine and a plain Keras script.

Run `make bench` (or `python bench/bench.py -c conf/default.yaml`) after `make demo-data`. Prints
each figure as it is measured, then one last line of `name=value` pairs to compare runs. Runs
use their own MLflow store, feature cache and model name: the demo's champion is left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRACKING_TASKS = (
    "start-tracking",
    "log-stage",
    "log-resumed-stage",
    "register-challenger",
    "finish-tracking",
)
COMPARE_CONFIG = ROOT / "conf" / "compare.yaml"


def say(message: str) -> None:
    print(message, flush=True)


def forward_throughput(feature_extractor, size: int, batch: int = 128, batches: int = 40) -> float:
    """1. The limit: the pipeline's compiled inference step on in-memory tensors, already traced."""
    import numpy as np
    import tensorflow as tf

    from tasks.inference.forward import inference_step

    images = tf.constant(
        np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)), tf.float32
    )
    step = inference_step(feature_extractor, tf.TensorSpec(images.shape, images.dtype))
    step(images)  # warm up
    started = time.perf_counter()
    for _ in range(batches):
        step(images).numpy()
    return batch * batches / (time.perf_counter() - started)


def trace_seconds(feature_extractor, size: int) -> float:
    """The one-time cost of compiling the inference step for a model (once per model and process)."""
    import tensorflow as tf

    from tasks.inference.forward import inference_step

    images = tf.zeros((1, size, size, 3), tf.float32)
    started = time.perf_counter()
    inference_step(feature_extractor, tf.TensorSpec(images.shape, images.dtype))(images)
    return time.perf_counter() - started


def extraction_rounds(
    loaded, feature_extractor, rounds: int = 5
) -> tuple[list[tuple[float, float]], int, float]:
    """1 and 2, paired: each round times the limit and one extraction pass back to back.

    Extraction covers every demo image, from files, without the feature cache: decoding,
    resizing and the forward pass. The extractor's inference step is already traced, as it is for
    the limit; the one-time trace is timed on its own. The files are read once first, so the
    figure is not this machine's disk: right after `make demo-data` wrote them, reads here ran at
    half speed. The host's speed drifts by up to 15% between rounds on this 2-core VM, so each
    pass is compared with the limit measured beside it, and rounds alternate which goes first.
    Returns (limit, extraction) images/s per round, the image count and the first read's files/s.
    """
    from tasks.data.stream import image_dataset
    from tasks.data.table import load_image_table
    from tasks.inference.cached_pass import cached_features
    from tasks.inference.features import FeatureKey

    config = loaded.config
    table = load_image_table(loaded.path(config.data.path), 0.1, 0.2, config.seed)
    key = FeatureKey("bench", "MobileNet", "{}", "x", config.data.image_size, "avg")
    frame = table.frame
    started = time.perf_counter()
    for path in frame["path"]:
        Path(path).read_bytes()
    reads = len(frame) / (time.perf_counter() - started)

    def extraction() -> float:
        dataset = image_dataset(frame, table.classes, config.data.image_size, 128)
        started = time.perf_counter()
        cached_features(feature_extractor, dataset, frame, key, cache_dir=None)
        return len(frame) / (time.perf_counter() - started)

    def limit() -> float:
        return forward_throughput(feature_extractor, config.data.image_size)

    pairs = []
    for round_ in range(rounds):
        if round_ % 2:
            pass_, forward = extraction(), limit()
        else:
            forward, pass_ = limit(), extraction()
        pairs.append((forward, pass_))
    return pairs, len(frame), reads


def run_flow(config: str, overrides: list[str]) -> tuple[float, dict[str, float], object]:
    """3 and 6. One training-flow run: wall time, and seconds per task name (from Prefect)."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.train import train_classifier

    started = time.perf_counter()
    state = train_classifier(config, overrides, return_state=True)
    wall = time.perf_counter() - started
    result = state.result()
    flow_run_id = state.state_details.flow_run_id

    async def task_runs():
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )

    seconds: dict[str, float] = {}
    for run in asyncio.run(task_runs()):
        name = run.name.rsplit("-", 1)[0]
        seconds[name] = seconds.get(name, 0.0) + run.total_run_time.total_seconds()
    return wall, seconds, result


def gate_line(cold: dict[str, float], warm: dict[str, float]) -> str:
    """The promotion gate's time: the cold run has no champion, the warm one gates against it."""
    return (
        f"the promotion gate (promote-if-better): cold {cold.get('promote-if-better', 0.0):.1f} s,"
        f" warm {warm.get('promote-if-better', 0.0):.1f} s"
    )


def tracking_seconds(seconds: dict[str, float]) -> float:
    return sum(value for name, value in seconds.items() if name in TRACKING_TASKS)


def fresh_dvc_pull(work: Path) -> tuple[float, int]:
    """7. `dvc pull` of the pinned demo data into an empty checkout, from the project's remote."""
    checkout = work / "checkout"
    checkout.mkdir()
    shutil.copy(ROOT / "data.dvc", checkout / "data.dvc")
    dvc = str(Path(sys.executable).parent / "dvc")

    def ask(*command: str) -> str:
        return subprocess.run(
            [dvc, *command], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout

    # `dvc remote list` prints name, URL (a local path made absolute) and "(default)".
    remotes = [line.split() for line in ask("remote", "list").splitlines() if line.strip()]
    url = next(parts[1] for parts in remotes if parts[0] == ask("remote", "default").strip())
    for command in (["init", "--no-scm", "-q"], ["remote", "add", "-q", "-d", "bench", url]):
        subprocess.run([dvc, *command], cwd=checkout, check=True)
    started = time.perf_counter()
    subprocess.run([dvc, "pull", "-q"], cwd=checkout, check=True)
    seconds = time.perf_counter() - started
    return seconds, sum(1 for p in (checkout / "data").rglob("*") if p.is_file())


def plain_script(config: str) -> float:
    """3. The same work as a plain Keras script, in a process of its own."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "plain_keras.py"), config],
        capture_output=True,
        text=True,
        check=True,
    )
    say(f"   plain script: {done.stdout.strip().splitlines()[-1]}")
    return time.perf_counter() - started


def compare_vs_one_by_one(work: Path, budget: int) -> tuple[float, list[tuple[str, float]]]:
    """4. The comparison flow over compare.yaml's transfer strategies, then each one on its own.

    One budget; each lone run has a feature cache of its own, as separate training runs would.
    """
    from prefect import flow

    from flows.compare import compare_strategies
    from tasks.stages.preflight import load_and_check

    declared = load_and_check(str(COMPARE_CONFIG)).config.compare.strategies
    strategies = [
        s.model_dump(mode="json", exclude_unset=True) for s in declared if not s.from_scratch
    ]

    def timed(chosen: list[dict], cache: str) -> float:
        # An experiment of its own each: a lone run must not resume the comparison's stages.
        started = time.perf_counter()
        compare_strategies(
            str(COMPARE_CONFIG),
            [
                f"compare.strategies={json.dumps(chosen)}",
                f"compare.label_budgets=[{budget}]",
                "compare.seeds=null",
                f"feature_extraction.cache_dir={work / cache}",
                "registry.model_name=bench-compare",
                f"tracking.experiment=bench-{cache}",
            ],
        )
        return time.perf_counter() - started

    flow(name="bench-warm-up")(
        lambda: None
    )()  # Prefect's temporary server starts outside the timing
    together = timed(strategies, "compare-together")
    alone = [(s["name"], timed([s], f"compare-{s['name']}")) for s in strategies]
    return together, alone


def peak_rss(images_per_class: int, work: Path, size: int) -> dict[str, float]:
    """5. Peak RSS (MB) while loading, checking and extracting features for 10 x images_per_class,
    then filling the activation cache at the demo's two cuts in the same pass and reading one
    epoch of shuffled batches back from it; and the cache's bytes per image.

    Each peak is taken from after the model is built (Linux's VmHWM, reset through clear_refs),
    so it is the data's share on top of TensorFlow and the model, not TensorFlow's start-up peak.
    The lower of two runs: identical runs differed by up to 140 MB, as malloc's per-thread arenas
    happened to hold the decoded batches, and that noise only ever adds.
    """
    code = f"""
import json, shutil, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from tasks.inference.activations import ActivationKey, activation_dataset, features_and_cuts, split_at_cut
from tasks.data.demo import write_demo_dataset
from tasks.data.stream import image_dataset
from tasks.data.table import load_image_table, check_images
from tasks.inference.cached_pass import Wanted, cached_features, cached_outputs
from tasks.inference.features import FeatureKey
from tasks.model.bases import build_base
from tasks.model.blocks import unfrozen_layer_names
from tasks.model.classifier import build_classifier
root = Path({str(work)!r}) / "rss-{images_per_class}"
if not (root / "manifest.csv").is_file():
    write_demo_dataset(root, train_per_class={images_per_class}, val_per_class=0, test_per_class=1, seed=0)
classifier = build_classifier(build_base("MobileNet", "imagenet", {size}, {{"alpha": 0.25}}), "MobileNet", 10, "avg", 0.2, 0, 0)
cuts = [split_at_cut(classifier, unfrozen_layer_names(classifier.base, blocks)) for blocks in (2, 4)]
both = features_and_cuts(classifier, cuts)
import gc; gc.collect()
status = Path("/proc/self/status")
def peak():
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
    return int(fields["VmHWM"].split()[0]) / 1024
Path("/proc/self/clear_refs").write_text("5")  # reset the peak to what the process holds now
table = load_image_table(root / "manifest.csv", 0.0, 0.0, 0)
check_images(table)
frame = table.split("train")
key = FeatureKey("rss", "MobileNet", "{{}}", "x", {size}, "avg")
cache = Path({str(work)!r}) / f"cache-{images_per_class}-{{sys.argv[1]}}"
cached_features(classifier.feature_extractor, image_dataset(frame, table.classes, {size}, 128), frame, key, cache)
features = peak()
shutil.rmtree(cache)
Path("/proc/self/clear_refs").write_text("5")
wanted = [Wanted(key, cache)] + [Wanted(ActivationKey("rss", "MobileNet", "{{}}", "x", {size}, c.cut, "float32"), cache / "activations") for c in cuts]
entries = cached_outputs(both, image_dataset(frame, table.classes, {size}, 128), frame, wanted, "rss")
for _ in activation_dataset(entries[-1], 64, shuffle_seed=0)[0]:
    pass
stored = sum(f.stat().st_size for f in (cache / "activations").glob("*.features.npy"))
print(json.dumps({{"features": features, "activations": peak(), "bytes_per_image": stored / len(frame)}}))
shutil.rmtree(cache)
"""
    runs = []
    for run in ("a", "b"):
        done = subprocess.run(
            [sys.executable, "-c", code, run], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {name: min(run[name] for run in runs) for name in runs[0]}


def finetune_seconds(loaded, work: Path, rounds: int = 3) -> dict[str, float]:
    """11. The demo's fine-tuning stages with their test evaluations, through the whole model and
    through the activation cache, each after the head's stage on the same classifier state.

    The head's feature pass writes the activations at the stages' cuts, so what the cache costs
    there is counted too: the pass with the cuts against without, both into an empty cache.
    That difference is small beside either pass, so it is the median of `rounds` pairs run one
    after the other, the order alternating, rather than one pair that carries the noise of two
    whole passes. Warm: the stages again, every cache entry already filled.
    """
    from dataclasses import replace

    import keras
    from prefect import flow

    from tasks.data.table import load_image_table
    from tasks.model.classifier import build_classifier_for
    from tasks.stages.base import StageInputs
    from tasks.stages.frozen_features import cuts_ahead, extract_frozen_features
    from tasks.stages.plan import transfer_stages

    config = loaded.config
    table = load_image_table(loaded.path(config.data.path), 0.1, 0.2, config.seed)

    def setting_for(budget_mb: float, cache: str):
        tree = config.model_copy(
            update={
                "fine_tune": config.fine_tune.model_copy(update={"activation_cache_mb": budget_mb}),
                "feature_extraction": config.feature_extraction.model_copy(
                    update={"cache_dir": str(work / cache)}
                ),
            }
        )
        return replace(loaded, config=tree)

    @flow(name="bench-fine-tuning")
    def stages_timed(budget_mb: float, cache: str, train: bool = True) -> tuple[float, float]:
        """(the feature pass, the fine-tuning stages) in seconds; the stages 0 unless `train`."""
        setting = setting_for(budget_mb, cache)
        keras.utils.set_random_seed(config.seed)
        chosen = setting.config
        classifier = build_classifier_for.fn(
            chosen.base,
            chosen.head,
            chosen.compute,
            chosen.data.image_size,
            config.seed,
            setting.project,
            len(table.classes),
        )
        started = time.perf_counter()
        cuts = cuts_ahead(
            classifier,
            chosen.fine_tune.activation_cache_mb,
            table,
            None,
            transfer_stages(chosen),
        )
        cache_dir = StageInputs(classifier, table, setting, "bench").feature_cache_dir
        extract_frozen_features.fn(
            classifier,
            table,
            chosen.base,
            chosen.head.pooling,
            chosen.data,
            cache_dir,
            "bench",
            None,
            cuts,
        )
        extraction = time.perf_counter() - started
        if not train:
            return extraction, 0.0
        inputs = StageInputs(classifier, table, setting, data_version="bench")
        head, *stages = transfer_stages(setting.config)
        head.train(inputs)  # its features are cached now, as they are in the flow
        started = time.perf_counter()
        for stage in stages:
            stage.train(inputs)
        return extraction, time.perf_counter() - started

    budget = config.fine_tune.activation_cache_mb or 2048
    _, full = stages_timed(0, "finetune-full")
    _, cold = stages_timed(budget, "finetune-cached")
    _, warm = stages_timed(budget, "finetune-cached")
    stored = sum(f.stat().st_size for f in (work / "finetune-cached" / "activations").glob("*.npy"))
    differences = []
    for round_ in range(rounds):
        passes = {}
        for budget_mb in (0, budget) if round_ % 2 == 0 else (budget, 0):
            folder = f"finetune-pass-{budget_mb}"
            passes[budget_mb], _ = stages_timed(budget_mb, folder, train=False)
            shutil.rmtree(work / folder)
        differences.append(passes[budget] - passes[0])
    writing = statistics.median(differences)
    return {
        "full": full,
        "cold": cold + writing,
        "warm": warm,
        "writing": writing,
        "writing_rounds": differences,
        "cache_mb": stored / 1e6,
    }


def measure_training(args, loaded, overrides, work: Path, figures: dict[str, float]) -> None:
    """1, 2, 3, 5 and 6: the forward-pass limit, extraction, the training flow, memory, tracking."""
    from tasks.model.classifier import build_classifier_for

    size = loaded.config.data.image_size
    config = loaded.config
    extractor = build_classifier_for.fn(
        config.base,
        config.head,
        config.compute,
        config.data.image_size,
        config.seed,
        loaded.project,
        10,
    ).feature_extractor
    trace = trace_seconds(extractor, size)
    pairs, count, reads = extraction_rounds(loaded, extractor)
    ratios = sorted(extract / forward for forward, extract in pairs)
    ratio = statistics.median(ratios)
    forward = statistics.median(forward for forward, _ in pairs)
    extract = statistics.median(extract for _, extract in pairs)
    say(
        f"1. forward pass (compiled, in memory, batch 128): {forward:,.0f} images/s, median of"
        f" {len(pairs)} rounds ({min(f for f, _ in pairs):,.0f} to {max(f for f, _ in pairs):,.0f});"
        f" tracing it once took {trace:.2f} s"
    )
    with_trace = ratio * (count / extract) / (count / extract + trace)
    figures |= {"extract_vs_forward": ratio, "trace_s": trace}
    say(
        f"2. feature extraction from {count:,} files: {extract:,.0f} images/s, median of"
        f" {len(pairs)} rounds; paired with the limit beside it {ratio:.2f} x forward (median;"
        f" {ratios[0]:.2f} to {ratios[-1]:.2f}), {with_trace:.2f} x with the one-time trace;"
        f" first read of the files: {reads:,.0f} files/s"
    )
    say(
        "   rounds (forward / extraction images/s): "
        + ", ".join(f"{f:,.0f} / {e:,.0f}" for f, e in pairs)
    )

    cold, cold_tasks, result = run_flow(args.config, overrides)
    warm, warm_tasks, _ = run_flow(args.config, overrides)
    plain = plain_script(args.config)
    cold_tracking, warm_tracking = tracking_seconds(cold_tasks), tracking_seconds(warm_tasks)
    pull, files = fresh_dvc_pull(work)
    figures |= {
        "flow_cold_s": cold,
        "flow_warm_s": warm,
        "plain_s": plain,
        "flow_vs_plain_cold": cold / plain,
        "flow_vs_plain_warm": warm / plain,
        "tracking_share": warm_tracking / warm,
        "dvc_pull_fresh_s": pull,
        "pull_share": warm_tasks.get("pull-data", 0.0) / warm,
    }
    accuracy = result.stages[-1].test_accuracy
    say(
        f"3. training flow: cold {cold:.1f} s, warm {warm:.1f} s (accuracy {accuracy:.4f}); plain Keras script {plain:.1f} s"
    )
    say(f"   flow / plain: cold {cold / plain:.2f}, warm {warm / plain:.2f}")
    say(f"   {gate_line(cold_tasks, warm_tasks)}")
    say(
        f"6. MLflow tracking tasks: cold {cold_tracking:.1f} s ({cold_tracking / cold:.1%}), warm {warm_tracking:.1f} s ({warm_tracking / warm:.1%})"
    )
    say(
        f"7. dvc pull: in the flow (data up to date) cold {cold_tasks.get('pull-data', 0.0):.1f} s, "
        f"warm {warm_tasks.get('pull-data', 0.0):.1f} s ({warm_tasks.get('pull-data', 0.0) / warm:.1%}); "
        f"into an empty checkout {pull:.1f} s for {files:,} files"
    )

    timed = finetune_seconds(loaded, work)
    figures |= {
        "finetune_full_s": timed["full"],
        "finetune_cached_cold_s": timed["cold"],
        "finetune_cached_warm_s": timed["warm"],
        "finetune_cached_vs_full": timed["cold"] / timed["full"],
        "finetune_cached_warm_vs_full": timed["warm"] / timed["full"],
    }
    say(
        f"11. fine-tuning stages with their test evaluations: whole model {timed['full']:.1f} s;"
        f" through the activation cache {timed['cold']:.1f} s while it fills"
        f" ({timed['writing']:.1f} s of it in the head's feature pass, the median of"
        f" {', '.join(f'{d:.1f}' for d in timed['writing_rounds'])} s)"
        f" ({timed['cold'] / timed['full']:.2f} x), {timed['warm']:.1f} s once filled"
        f" ({timed['warm'] / timed['full']:.2f} x); cache {timed['cache_mb']:,.0f} MB on disk"
    )

    if not args.skip_rss:
        small, large = peak_rss(1000, work, size), peak_rss(6000, work, size)
        figures |= {
            "rss_mb_small": small["features"],
            "rss_mb_large": large["features"],
            "rss_mb_activations_small": small["activations"],
            "rss_mb_activations_large": large["activations"],
            "activation_bytes_per_image": large["bytes_per_image"],
        }
        say(
            f"5. peak RSS: {small['features']:,.0f} MB for 10,000 images, "
            f"{large['features']:,.0f} MB for 60,000 ({large['features'] / small['features']:.2f} x);"
            f" with the activation cache at the demo's two cuts filled in the same pass and one "
            f"epoch read back: {small['activations']:,.0f} MB and {large['activations']:,.0f} MB "
            f"({large['activations'] / small['activations']:.2f} x), the cache "
            f"{large['bytes_per_image']:,.0f} bytes an image"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=str(ROOT / "conf" / "default.yaml"))
    parser.add_argument("--skip-rss", action="store_true", help="skip the 60,000-image memory run")
    parser.add_argument("--only-rss", action="store_true", help="measure only memory (5)")
    parser.add_argument(
        "--only-flow",
        action="store_true",
        help="measure only the flow against the plain script (3)",
    )
    parser.add_argument(
        "--only-compare", action="store_true", help="measure only the comparison flow (4)"
    )
    parser.add_argument(
        "--compare-budget", type=int, default=100, help="labelled images per class for (4)"
    )
    parser.add_argument(
        "--only-grid", action="store_true", help="measure only resume, workers and grid (8-10)"
    )
    parser.add_argument(
        "--only-finetune", action="store_true", help="measure only fine-tuning's cache (11)"
    )
    args = parser.parse_args()

    from tasks.stages.preflight import load_and_check

    loaded = load_and_check(args.config)
    size = loaded.config.data.image_size
    work = Path(tempfile.mkdtemp(prefix="transferflow-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    overrides = [
        f"feature_extraction.cache_dir={work / 'features'}",
        "registry.model_name=bench-classifier",
        "tracking.experiment=bench",
        "tracking.resume=false",  # time training, not resuming the previous run's stages
    ]
    figures: dict[str, float] = {}
    say(f"benchmark on {os.cpu_count()} cores, {size} px, config {args.config}")

    if args.only_flow:
        cold, cold_tasks, result = run_flow(args.config, overrides)
        warm, warm_tasks, _ = run_flow(args.config, overrides)
        plain = plain_script(args.config)
        say(
            f"3. training flow: cold {cold:.1f} s, warm {warm:.1f} s (accuracy "
            f"{result.stages[-1].test_accuracy:.4f}); plain Keras script {plain:.1f} s; "
            f"flow_vs_plain_cold={cold / plain:.3f} flow_vs_plain_warm={warm / plain:.3f}"
        )
        say(f"   {gate_line(cold_tasks, warm_tasks)}")
        shutil.rmtree(work, ignore_errors=True)
        return
    if args.only_rss:
        for images_per_class in (1000, 6000):
            say(f"5. {images_per_class * 10:,} images: {peak_rss(images_per_class, work, size)}")
        shutil.rmtree(work, ignore_errors=True)
        return
    if args.only_finetune:
        timed = finetune_seconds(loaded, work)
        say(
            f"11. {timed}: cold/full {timed['cold'] / timed['full']:.3f}, warm/full {timed['warm'] / timed['full']:.3f}"
        )
        shutil.rmtree(work, ignore_errors=True)
        return
    if not args.only_grid:
        if not args.only_compare:
            measure_training(args, loaded, overrides, work, figures)
        measure_comparison(args, work, figures)
    measure_grid(args, overrides[:1], work, figures)
    shutil.rmtree(work, ignore_errors=True)
    print(" ".join(f"{name}={value:.3f}" for name, value in figures.items()))


def measure_comparison(args, work: Path, figures: dict[str, float]) -> None:
    """4: the comparison against its strategies one by one."""
    together, alone = compare_vs_one_by_one(work, args.compare_budget)
    total = sum(seconds for _, seconds in alone)
    figures |= {"compare_s": together, "one_by_one_s": total, "compare_vs_sum": together / total}
    say(
        f"4. comparison flow, {len(alone)} strategies at {args.compare_budget} labels per class: "
        f"{together:.1f} s; one by one {total:.1f} s ({together / total:.2f} x)"
    )
    for name, seconds in alone:
        say(f"   {name} alone: {seconds:.1f} s")


def measure_grid(args, overrides: list[str], work: Path, figures: dict[str, float]) -> None:
    """8, 9 and 10: resume after a kill, two workers against one, memory over a large grid."""
    from grid_figures import (  # beside this file
        compare_with_workers,
        grid_memory,
        resume_after_kill,
    )

    retrained, resumed, rerun = resume_after_kill(args.config, overrides, work)
    figures |= {"resume_retrained_stages": retrained, "resume_rerun_s": rerun}
    say(
        f"8. kill -9 during the last stage, then the same command: {resumed} stages resumed, "
        f"{retrained} trained again besides the killed one; the rerun took {rerun:.1f} s"
    )
    budgets = [10, 25]
    one, cells = compare_with_workers(work, 1, budgets)
    two, _ = compare_with_workers(work, 2, budgets)
    figures |= {"compare_workers_vs_one": two / one, "one_worker_vs_cells": one / cells}
    say(
        f"9. comparison of the transfer strategies at {budgets} labels per class: 1 worker "
        f"{one:.1f} s, 2 workers {two:.1f} s ({two / one:.2f} x); 1 worker against the sum of "
        f"its cells ({cells:.1f} s): {one / cells:.2f} x"
    )
    largest, growth, count = grid_memory(work, [2, 4, 6, 8, 10], workers=2)
    figures |= {"grid_rss_mb_max": largest, "grid_worker_growth_mb": growth}
    say(
        f"10. a grid of {count} cells on 2 workers: largest peak RSS of any process "
        f"{largest:,.0f} MB; a worker's peak grew by at most {growth:,.0f} MB from its first "
        "cell to its last"
    )


if __name__ == "__main__":
    main()
