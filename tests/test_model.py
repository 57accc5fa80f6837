"""The classifier as a user meets it: real Keras models, tiny random images, no downloads."""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import keras
import numpy as np
import pytest

from tasks.model.bases import (
    UnknownArchitectureError,
    WeightsNotFoundError,
    architecture_names,
    build_base,
    check_architecture,
    preprocessing_layer,
    resolve_weights,
)
from tasks.model.blocks import base_blocks, unfreeze_top_blocks
from tasks.model.classifier import build_classifier

MOBILENET_FILE = "mobilenet_2_5_224_tf_no_top.h5"
SMALL = {"alpha": 0.25}


def pixels(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3)).astype("float32")


def is_batch_norm(layer: keras.Layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


@pytest.fixture
def empty_keras_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "keras_home"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route every download through a proxy port nobody listens on, online or not."""
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    for variable in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    # urllib caches its opener (and the proxies it read) on first use.
    monkeypatch.setattr(urllib.request, "_opener", None)


@pytest.fixture
def weights_dir() -> Path:
    folder = os.environ.get("TRANSFERFLOW_TEST_WEIGHTS_DIR")
    if not folder:
        pytest.skip("TRANSFERFLOW_TEST_WEIGHTS_DIR is unset: no folder of real .h5 weights")
    if not (Path(folder) / MOBILENET_FILE).is_file():
        pytest.skip(f"TRANSFERFLOW_TEST_WEIGHTS_DIR={folder} has no {MOBILENET_FILE}")
    return Path(folder)


# --- architectures -------------------------------------------------------------------------------


def test_architecture_names_are_the_keras_applications_constructors() -> None:
    names = architecture_names()
    expected = {"MobileNet", "MobileNetV3Small", "ResNet152V2", "EfficientNetV2L", "NASNetLarge"}
    assert expected <= set(names)
    assert {"ConvNeXtTiny", "ConvNeXtXLarge", "DenseNet201", "InceptionResNetV2"} <= set(names)
    assert all(callable(getattr(keras.applications, name)) for name in names)
    assert "mobilenet" not in names and "imagenet_utils" not in names


def test_unknown_architecture_suggests_the_close_name() -> None:
    check_architecture("MobileNet")
    with pytest.raises(UnknownArchitectureError, match=r"Did you mean 'MobileNet'") as error:
        check_architecture("Mobilenet")
    assert "keras.applications" in str(error.value)
    with pytest.raises(UnknownArchitectureError, match="ResNet50"):
        build_base("Resnet50", None, 32)


# --- preprocessing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "family"),
    [
        ("MobileNet", keras.applications.mobilenet),  # "tf": x / 127.5 - 1
        ("DenseNet121", keras.applications.densenet),  # "torch": (x / 255 - mean) / std
        ("ResNet50", keras.applications.resnet),  # "caffe": RGB -> BGR, minus mean
        ("VGG16", keras.applications.vgg16),  # "caffe"
        ("EfficientNetB0", keras.applications.efficientnet),  # identity: normalises inside
    ],
)
def test_preprocessing_layer_equals_the_family_preprocess_input(architecture, family) -> None:
    images = pixels(2, 8)
    expected = family.preprocess_input(images.copy())
    layer = preprocessing_layer(architecture)
    got = keras.ops.convert_to_numpy(layer(images))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert isinstance(layer, keras.layers.Dense) and not layer.trainable_weights
    if family is keras.applications.resnet:
        # The channel swap is really there, not only the mean.
        assert got[0, 0, 0, 0] == pytest.approx(images[0, 0, 0, 2] - 103.939, abs=1e-3)


# --- base construction and weights ---------------------------------------------------------------


def test_build_base_rejects_bad_options_and_sizes_before_building() -> None:
    with pytest.raises(ValueError, match=r"'alph'.*MobileNet.*Did you mean 'alpha'"):
        build_base("MobileNet", None, 32, {"alph": 0.25})
    with pytest.raises(ValueError, match=r"'pooling'.*head\.pooling"):
        build_base("MobileNet", None, 32, {"pooling": "avg"})
    with pytest.raises(ValueError, match=r"data\.image_size 16 is too small.*at least 32"):
        build_base("MobileNet", None, 16, SMALL)
    with pytest.raises(ValueError, match=r"data\.image_size 64 .*at least 71"):
        build_base("Xception", None, 64)


def test_built_base_is_frozen_and_takes_the_image_size() -> None:
    base = build_base("MobileNet", None, 40, SMALL)
    assert base.input_shape == (None, 40, 40, 3)
    assert not base.trainable and not base.trainable_weights


def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "weights.h5"
    with pytest.raises(WeightsNotFoundError, match=re.escape(str(missing))):
        resolve_weights("MobileNet", str(missing), SMALL)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_base("MobileNet", str(missing), 96, SMALL)


def test_imagenet_weights_missing_offline_names_file_and_folder_quickly(
    empty_keras_home: Path, no_network: None
) -> None:
    started = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as error:
        build_base("MobileNet", "imagenet", 96, SMALL)
    message = str(error.value)
    assert str(empty_keras_home / "models" / MOBILENET_FILE) in message
    assert "base.weights" in message and "KERAS_HOME" in message
    assert time.monotonic() - started < 30
    assert not (empty_keras_home / "models" / MOBILENET_FILE).exists()


def test_real_imagenet_weights_load_offline_from_keras_home(
    weights_dir: Path, empty_keras_home: Path, no_network: None
) -> None:
    (empty_keras_home / "models").mkdir()
    shutil.copy(weights_dir / MOBILENET_FILE, empty_keras_home / "models" / MOBILENET_FILE)
    imagenet = build_base("MobileNet", "imagenet", 96, SMALL)
    from_path = build_base("MobileNet", str(weights_dir / MOBILENET_FILE), 96, SMALL)
    random = build_base("MobileNet", None, 96, SMALL)
    for loaded, by_path, fresh in zip(
        imagenet.get_weights(), from_path.get_weights(), random.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(loaded, by_path)
        assert not np.array_equal(loaded, fresh)
    assert resolve_weights("MobileNet", "imagenet", SMALL, 96) == str(
        empty_keras_home / "models" / MOBILENET_FILE
    )


# --- blocks and unfreezing -----------------------------------------------------------------------


def assert_blocks_unfreeze_whole_and_in_order(base: keras.Model) -> list[int]:
    blocks = base_blocks(base)
    assert len(blocks) >= 5, [b.name for b in blocks]
    names = [name for block in blocks for name in block.layer_names]
    assert sorted(names) == sorted(layer.name for layer in base.layers)

    counts = [unfreeze_top_blocks(base, n) for n in range(1, len(blocks) + 1)]
    assert all(fewer < more for fewer, more in itertools.pairwise(counts)), counts
    assert unfreeze_top_blocks(base, "all") == counts[-1]
    for layer in base.layers:
        if is_batch_norm(layer):
            assert not layer.trainable and not layer.trainable_weights, layer.name
        elif layer.weights:
            assert layer.trainable, layer.name
    with pytest.raises(ValueError, match=f"has {len(blocks)} blocks"):
        unfreeze_top_blocks(base, len(blocks) + 1)
    return counts


def test_unfreezing_the_top_block_of_mobilenet_trains_exactly_its_last_block() -> None:
    base = build_base("MobileNet", None, 32, SMALL)
    blocks = base_blocks(base)
    assert [b.name for b in blocks] == ["stem"] + [f"conv_{n}" for n in range(1, 14)]
    unfreeze_top_blocks(base, 1)
    trainable = {layer.name for layer in base.layers if layer.trainable_weights}
    assert trainable == {"conv_dw_13", "conv_pw_13"}
    assert_blocks_unfreeze_whole_and_in_order(base)


def test_a_base_without_keras_applications_names_splits_at_single_tensor_seams() -> None:
    inputs = keras.Input((4,))
    left = keras.layers.Dense(4, name="left")(inputs)
    right = keras.layers.Dense(4, name="right")(inputs)
    joined = keras.layers.Add(name="join")([left, right])
    outputs = keras.layers.Dense(2, name="out")(joined)
    blocks = base_blocks(keras.Model(inputs, outputs))
    # The two parallel branches only make sense together; the input has nothing to train.
    assert [set(b.layer_names) - {inputs._keras_history.operation.name} for b in blocks] == [
        {"left", "right", "join"},
        {"out"},
    ]


FAMILIES = {
    "MobileNetV2": 32,
    "MobileNetV3Small": 32,
    "ResNet50": 32,
    "ResNet50V2": 32,
    "VGG16": 32,
    "Xception": 71,
    "InceptionV3": 75,
    "DenseNet121": 32,
    "EfficientNetB0": 32,
    "EfficientNetV2B0": 32,
    "ConvNeXtTiny": 32,
    "NASNetMobile": 32,
}


@pytest.mark.slow
@pytest.mark.parametrize("architecture", FAMILIES)
def test_every_family_unfreezes_whole_blocks(architecture: str) -> None:
    base = build_base(architecture, None, FAMILIES[architecture])
    assert_blocks_unfreeze_whole_and_in_order(base)
    # Whole blocks: a layer only takes inputs from its own block or the ones just before it
    # (NASNet cells read the two previous cells), so no residual block is split.
    blocks = base_blocks(base)
    block_of = {name: i for i, block in enumerate(blocks) for name in block.layer_names}
    reach = 2 if architecture.startswith("NASNet") else 1
    for layer in base.layers:
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                source = tensor._keras_history.operation.name
                if source in block_of:
                    distance = block_of[layer.name] - block_of[source]
                    assert 0 <= distance <= reach, (layer.name, source)


# --- the classifier ------------------------------------------------------------------------------
# ResNet50: with random weights its features still tell images apart at 32 px (MobileNet's fade
# to ~1e-17, which would let a broken head or preprocessing pass unnoticed).


def small_classifier(architecture: str = "ResNet50", dropout: float = 0.2, hidden_units: int = 8):
    base = build_base(architecture, None, 32, SMALL if architecture == "MobileNet" else {})
    return build_classifier(base, architecture, 3, "avg", dropout, hidden_units, seed=1)


def numpy(tensor) -> np.ndarray:
    return keras.ops.convert_to_numpy(tensor)


def test_head_trained_on_features_is_the_full_models_head() -> None:
    classifier = small_classifier()
    images = pixels(12, 32)
    labels = np.arange(12) % 3
    before = numpy(classifier.model(images))
    features = numpy(classifier.feature_extractor(images))
    assert features.shape == (12, 2048) and features.std(axis=0).mean() > 1e-2

    classifier.head.compile(
        optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy"
    )
    classifier.head.fit(features, labels, epochs=3, batch_size=4, verbose=0)

    after = numpy(classifier.model(images))
    np.testing.assert_allclose(after, numpy(classifier.head(features)), rtol=1e-5, atol=1e-6)
    assert np.abs(after - before).max() > 1e-2
    np.testing.assert_allclose(after.sum(axis=1), 1.0, rtol=1e-5)


def test_fine_tuning_trains_the_top_blocks_but_never_batch_norm_statistics() -> None:
    classifier = small_classifier(dropout=0.0)
    base = classifier.base
    unfreeze_top_blocks(base, 3)  # conv5_block1..3
    watched = {
        "top conv": base.get_layer("conv5_block3_2_conv").kernel,
        "frozen conv": base.get_layer("conv4_block6_2_conv").kernel,
        "top bn mean": base.get_layer("conv5_block3_2_bn").moving_mean,
        "top bn gamma": base.get_layer("conv5_block3_2_bn").gamma,
    }
    before = {name: variable.numpy().copy() for name, variable in watched.items()}
    images = pixels(8, 32, seed=3)

    classifier.model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy"
    )
    classifier.model.fit(images, np.arange(8) % 3, epochs=1, batch_size=8, verbose=0)

    changed = {name for name, v in watched.items() if not np.array_equal(v.numpy(), before[name])}
    assert changed == {"top conv"}
    # Frozen BatchNormalization runs in inference mode even when the model is called training.
    np.testing.assert_allclose(
        numpy(classifier.model(images, training=True)),
        numpy(classifier.model(images, training=False)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_a_fine_tuning_stage_traces_its_training_step_once(monkeypatch) -> None:
    """Keras makes the optimizer's slots while it traces the first training step, and
    TensorFlow then traces a step that made variables a second time: for a whole MobileNet at
    96 px that is about 1.7 s more in every stage (docs/performance.md). The stage makes them
    first."""
    import tensorflow as tf
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    from tasks.stages.fitting import fine_tune

    traced = []
    train_step = TensorFlowTrainer.train_step  # runs only while the step is being traced

    def counted(self, data):
        traced.append(self.name)
        return train_step(self, data)

    monkeypatch.setattr(TensorFlowTrainer, "train_step", counted)
    classifier = small_classifier("MobileNet")
    unfreeze_top_blocks(classifier.base, "all")
    images = tf.data.Dataset.from_tensor_slices((pixels(8, 32, seed=3), np.arange(8) % 3))
    history = fine_tune(
        classifier.model,
        images.batch(4),
        None,
        epochs=2,
        learning_rate=1e-3,
        patience=1,
        seed=0,
        stage="fine_tune_1",
    )
    assert len(history.epochs["loss"]) == 2
    assert traced == [classifier.model.name]


@pytest.mark.parametrize(
    ("architecture", "family"), [("MobileNet", "mobilenet"), ("ResNet50", "resnet")]
)
def test_saved_classifier_loads_in_safe_mode_without_custom_objects(
    architecture: str, family: str, tmp_path: Path
) -> None:
    classifier = small_classifier(architecture)
    images = pixels(4, 32, seed=5)
    path = tmp_path / "classifier.keras"
    classifier.model.save(path)

    loaded = keras.saving.load_model(path, safe_mode=True)

    for saved, restored in zip(classifier.model.weights, loaded.weights, strict=True):
        assert saved.path == restored.path
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())
    np.testing.assert_allclose(
        numpy(loaded(images)), numpy(classifier.model(images)), rtol=1e-5, atol=1e-6
    )
    assert loaded.layers[1].name == f"preprocess_{family}"
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in loaded._flatten_layers())


def test_a_random_base_is_the_same_for_a_seed_while_other_threads_draw_random_numbers(
    tmp_path: Path,
) -> None:
    """Keras seeds unseeded initializers from Python's global `random`; a thread drawing from
    it (as Prefect's and MLflow's may) must not change the base a seed builds."""
    from conf import LoadedConfig, PipelineConfig
    from tests.tiny_stages import classifier_for

    tree = {"base": {"architecture": "MobileNetV2", "weights": None}, "data": {"image_size": 32}}
    loaded = LoadedConfig(PipelineConfig.model_validate(tree), tmp_path)
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            random.random()

    drawing = threading.Thread(target=draw, daemon=True)
    drawing.start()
    try:
        first, second = (classifier_for(loaded, 3).base for _ in range(2))
    finally:
        stop.set()
        drawing.join()
    assert len(first.weights) == len(second.weights) > 100
    for mine, theirs in zip(first.weights, second.weights, strict=True):
        np.testing.assert_array_equal(numpy(mine), numpy(theirs), err_msg=mine.path)
