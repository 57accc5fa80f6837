"""compute.precision and compute.jit_compile: mixed float16 and XLA train on a CPU, keep the
softmax in float32, key their own cached features and stages, and every run names its device."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from mlflow import MlflowClient

from conf import LoadedConfig, PipelineConfig
from tasks.inference.activations import split_at_cut
from tasks.model.bases import BaseOptionsError
from tasks.registry.versions import config_fingerprint
from tasks.stages.base import StageInputs
from tasks.stages.fine_tune import fine_tune_stage_on_activations
from tasks.stages.frozen_features import extract_frozen_features
from tasks.stages.plan import transfer_stages
from tasks.stages.runner import lineage_keys, run_stages
from tasks.tracking.steps import finish_tracking, start_tracking
from tests.tiny_stages import classifier_for, setting

HAS_GPU = bool(tf.config.list_physical_devices("GPU"))


def computing(tmp_path: Path, precision: str, jit_compile: bool = False) -> LoadedConfig:
    """The tiny 32 px MobileNet setting with a short head stage and one fine-tuning stage."""
    tree = setting(tmp_path, "MobileNet").config.model_dump(mode="json")
    tree["compute"] = {"precision": precision, "jit_compile": jit_compile}
    tree["feature_extraction"].update(epochs=3, patience=2)
    tree["fine_tune"]["stages"] = tree["fine_tune"]["stages"][:1]
    return LoadedConfig(PipelineConfig.model_validate(tree), tmp_path)


@pytest.mark.training
def test_mixed_float16_with_xla_trains_the_head_and_every_run_names_its_device(
    tmp_path: Path, tiny_table, mlflow_uri: str
) -> None:
    loaded = computing(tmp_path, "mixed_float16", jit_compile=True)
    classifier = classifier_for(loaded, len(tiny_table.classes))
    assert keras.config.dtype_policy().name == "float32"  # the next model built is not mixed
    assert classifier.base.layers[-1].compute_dtype == "float16"
    assert classifier.model.output.dtype == "float32"  # probabilities and loss in float32

    run = start_tracking.fn(
        loaded.config, loaded.project, tiny_table, "v1", strategy="feature_extraction"
    )
    inputs = StageInputs(classifier, tiny_table, loaded, "v1")
    outcome = run_stages(run, transfer_stages(loaded.config)[:1], inputs, resume=False)
    finish_tracking.fn(run, outcome.summaries, failed=False)

    assert isinstance(classifier.head.optimizer, keras.optimizers.LossScaleOptimizer)
    assert classifier.head.jit_compile is True
    (history,) = outcome.histories
    assert history.epochs_run == 3 and np.isfinite(history.epochs["loss"]).all()
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(run.run_id)
    assert parent.data.params["compute.precision"] == "mixed_float16"
    assert parent.data.params["compute.jit_compile"] == "True"
    (stage,) = client.search_runs(
        [run.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.run_id}'"
    )
    assert stage.data.tags["stage"] == "feature_extraction"
    for logged in (parent, stage):
        device = logged.data.tags["device"]
        assert device.startswith("GPU:0") if HAS_GPU else device == "CPU"


@pytest.mark.training
def test_mixed_float16_fine_tunes_through_activations_of_its_own(
    tmp_path: Path, tiny_table
) -> None:
    """The top above the cut is built mixed too, so Keras scales its loss when it compiles it."""
    trained = {}
    for precision in ("mixed_float16", "float32"):
        loaded = computing(tmp_path, precision)
        classifier = classifier_for(loaded, len(tiny_table.classes))
        stage = transfer_stages(loaded.config)[1]
        inputs = StageInputs(classifier, tiny_table, loaded, "v1")
        config = loaded.config
        trained[precision] = fine_tune_stage_on_activations.fn(
            classifier,
            tiny_table,
            stage,
            config.base,
            config.data,
            inputs.feature_cache_dir,
            config.fine_tune.activation_cache_mb,
            config.seed,
            config.compute.jit_compile,
            "v1",
            None,
        )
        assert split_at_cut(classifier).top.dtype_policy.name == precision
    half, full = trained["mixed_float16"], trained["float32"]
    assert half is not None and full is not None  # both trained through the activation cache
    assert np.isfinite(half.history.epochs["loss"]).all()
    entries = sorted((tmp_path / "cache" / "activations").glob("*.features.npy"))
    assert len(entries) == 6  # train, val and test of each precision: none shared


def test_float32_and_mixed_float16_features_are_separate_cache_entries(
    tmp_path: Path, tiny_table
) -> None:
    mixed, single = computing(tmp_path, "mixed_float16"), computing(tmp_path, "float32")
    n = len(tiny_table.classes)

    def features(loaded: LoadedConfig):
        config = loaded.config
        classifier = classifier_for(loaded, n)
        inputs = StageInputs(classifier, tiny_table, loaded, "v1")
        return extract_frozen_features.fn(
            classifier,
            tiny_table,
            config.base,
            config.head.pooling,
            config.data,
            inputs.feature_cache_dir,
            "v1",
        )

    half, full = features(mixed), features(single)
    assert not any(entry.reused for entry in full.values())  # same cache folder, own entries
    assert {e.features for e in half.values()}.isdisjoint(e.features for e in full.values())
    half_test, full_test = half["test"].load()[0], full["test"].load()[0]
    assert not np.array_equal(half_test, full_test)  # really computed in float16
    np.testing.assert_allclose(half_test, full_test, rtol=0.05, atol=0.05)


def test_precision_and_xla_key_stages_and_retrains_but_the_defaults_change_no_key(
    tmp_path: Path, tiny_table
) -> None:
    # One classifier for every setting: the keys must follow the compute settings alone, not
    # how a base with random weights happened to be drawn.
    built = computing(tmp_path, "float32")
    classifier = classifier_for(built, len(tiny_table.classes))

    def keys(**compute) -> tuple[list[str], str]:
        tree = built.config.model_dump(mode="json")
        tree["compute"] = compute
        loaded = LoadedConfig(PipelineConfig.model_validate(tree), tmp_path)
        inputs = StageInputs(classifier, tiny_table, loaded, "v1")
        return lineage_keys(transfer_stages(loaded.config), inputs), config_fingerprint(
            loaded.config
        )

    default = keys()
    assert keys(precision="float32", jit_compile=False) == default
    for changed in ({"precision": "mixed_float16"}, {"jit_compile": True}):
        stages, fingerprint = keys(**changed)
        assert fingerprint != default[1], changed
        assert not set(stages) & set(default[0]), changed  # no stage resumed across the change


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_a_failed_build_leaves_the_global_policy_as_it_was(tmp_path: Path, precision) -> None:
    tree = computing(tmp_path, precision).config.model_dump(mode="json")
    tree["base"]["options"] = {"alpah": 0.25}  # rejected while the base is being built
    loaded = LoadedConfig(PipelineConfig.model_validate(tree), tmp_path)
    with pytest.raises(BaseOptionsError, match="Did you mean 'alpha'"):
        classifier_for(loaded, 10)
    assert keras.config.dtype_policy().name == "float32"
