"""Keras fitting for the stages: the head on features, fine-tuning, from scratch; fresh callbacks each."""

from __future__ import annotations

import math
import time

import keras
import numpy as np

from conf.data import DataConfig
from tasks.data.stream import image_dataset
from tasks.model.batch_norm import measure_batch_norm_statistics
from tasks.runtime.run_log import epoch_line, run_logger
from tasks.tracking.history import TrainingHistory


class EpochLog(keras.callbacks.Callback):
    """A line per epoch in the run's log (the Prefect UI's, in a run): stage, epoch, loss and
    validation metrics, so a long stage shows where it is."""

    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    def on_epoch_end(self, epoch: int, logs=None) -> None:

        line = epoch_line(self.stage, epoch + 1, self.params.get("epochs", epoch + 1), logs or {})
        run_logger().info(line)


def _compile(model, learning_rate: float, jit_compile: bool, steps_per_execution: int = 1) -> None:
    """Adam on sparse cross-entropy; Keras wraps the optimizer to scale the loss of a model
    built under mixed_float16 (tasks.model.classifier builds every model it trains that way)."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    # With TensorFlow, Keras creates the optimizer's slot variables while it traces the first
    # training step, and a tf.function that creates variables is traced a second time. Made here,
    # the step is traced once (docs/performance.md has what that saves).
    model.optimizer.build(model.trainable_variables)


def _fit(
    model,
    train,
    validation,
    epochs: int,
    patience: int,
    learning_rate: float,
    stage: str,
    jit_compile: bool,
    extra_callbacks: tuple[keras.callbacks.Callback, ...] = (),
    steps_per_execution: int = 1,
    **fit_args,
):
    """Compile afresh and fit with fresh callbacks, so no stage inherits another's state."""
    _compile(model, learning_rate, jit_compile, steps_per_execution)
    callbacks = [*extra_callbacks, EpochLog(stage)]
    if validation is not None:
        stopper = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=patience, restore_best_weights=True
        )
        callbacks.append(stopper)
    started = time.perf_counter()
    history = model.fit(
        train, validation_data=validation, epochs=epochs, callbacks=callbacks, verbose=0, **fit_args
    )
    seconds = time.perf_counter() - started
    epochs_seen = {
        name: tuple(float(v) for v in values) for name, values in history.history.items()
    }
    if validation is not None:
        best_epoch = int(np.argmin(epochs_seen["val_loss"]))
    else:
        best_epoch = len(epochs_seen["loss"]) - 1
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    return TrainingHistory(
        epochs=epochs_seen,
        best_epoch=best_epoch,
        seconds=seconds,
        trainable_params=trainable,
        learning_rate=learning_rate,
        stopped_early=len(epochs_seen["loss"]) < epochs,
    )


# At most this many of the head's steps run in one call (well under a second): a signal reaches
# Python, and so the handler that closes the runs, only between calls.
_HEAD_STEPS_A_CALL = 1000


def train_head(
    head,
    train: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray] | None,
    *,
    epochs: int,
    learning_rate: float,
    patience: int,
    batch_size: int,
    seed: int,
    stage: str,
    jit_compile: bool = False,
) -> TrainingHistory:
    """Fit the new head on frozen-base features (arrays), keeping the best validation epoch.

    A head's step is a matrix product, so Keras's own cost per step and per epoch would dominate:
    the arrays go in as tf.data pipelines (reshuffled every epoch from `seed`), and a whole epoch
    runs as one call of the compiled training step (`steps_per_execution`, up to 1,000 steps).
    The epochs, batches and callbacks stay those of `fit`. Fine-tuning keeps one step a call: its
    steps cost tens of milliseconds, and it gained nothing measurable.
    """
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    features, labels = train
    batches = tf.data.Dataset.from_tensor_slices((features, labels))
    batches = batches.shuffle(len(features), seed=seed, reshuffle_each_iteration=True)
    checked = None
    if validation is not None:
        checked = tf.data.Dataset.from_tensor_slices(validation).batch(batch_size).cache()
    return _fit(
        head,
        batches.batch(batch_size).prefetch(2),
        checked,
        epochs,
        patience,
        learning_rate,
        stage,
        jit_compile,
        steps_per_execution=min(max(1, math.ceil(len(features) / batch_size)), _HEAD_STEPS_A_CALL),
        shuffle=False,
    )


def fine_tune(
    model,
    train,
    validation,
    *,
    epochs: int,
    learning_rate: float,
    patience: int,
    seed: int,
    stage: str,
    jit_compile: bool = False,
) -> TrainingHistory:
    """Fit the whole classifier on image batches after a stage has unfrozen more of the base.

    BatchNorm layers stay frozen (unfreeze_top_blocks never makes them trainable, and a frozen
    Keras 3 BatchNorm runs in inference mode even under fit), so they keep the ImageNet statistics
    that small fine-tuning batches would otherwise overwrite.
    """
    keras.utils.set_random_seed(seed)
    # The dataset reshuffles itself each epoch; Keras cannot shuffle a tf.data pipeline.
    return _fit(
        model, train, validation, epochs, patience, learning_rate, stage, jit_compile, shuffle=False
    )


class _MeasuredBatchNorm(keras.callbacks.Callback):
    """Before each validation, BatchNorm statistics measured on a fixed batch of training images."""

    def __init__(self, images) -> None:
        super().__init__()
        self.images = images

    def on_test_begin(self, logs=None) -> None:

        measure_batch_norm_statistics(self.model, self.images)


def fit_from_scratch(
    model,
    train,
    validation,
    images,
    *,
    epochs: int,
    learning_rate: float,
    patience: int,
    seed: int,
    stage: str,
    jit_compile: bool = False,
) -> TrainingHistory:
    """Fit a network whose every layer, BatchNorm included, trains from random weights.

    Keras' running BatchNorm averages (momentum 0.99, starting at variance 1) need thousands of
    steps to reach a from-scratch network's statistics (variances near 1e-4); ten labels per class
    give a few dozen steps, so validation and early stopping would judge a network that predicts
    one class in inference mode. The statistics are measured on `images` (training images)
    before each validation and once more at the end, for the weights the model keeps.
    """
    keras.utils.set_random_seed(seed)
    history = _fit(
        model,
        train,
        validation,
        epochs,
        patience,
        learning_rate,
        stage,
        jit_compile,
        extra_callbacks=(_MeasuredBatchNorm(images),),
        shuffle=False,
    )
    measure_batch_norm_statistics(model, images)
    return history


def augmentation_layers(settings, seed: int) -> keras.Sequential | None:
    """Keras's random preprocessing layers for `settings` (an AugmentationConfig), or None."""
    if not settings.enabled:
        return None
    layers: list[keras.layers.Layer] = []
    if settings.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if settings.rotation:
        layers.append(keras.layers.RandomRotation(settings.rotation, seed=seed + 1))
    if settings.zoom:
        layers.append(keras.layers.RandomZoom(settings.zoom, seed=seed + 2))
    if settings.translation:
        shift = settings.translation
        layers.append(keras.layers.RandomTranslation(shift, shift, seed=seed + 3))
    return keras.Sequential(layers, name="augmentation")


def image_splits(table, data: DataConfig, seed: int, augmentation=None):
    """The training images shuffled by `seed`, augmented when `augmentation` (an
    AugmentationConfig) is on, and the validation images (None when there are none)."""
    size, batch = data.image_size, data.batch_size
    augment = augmentation_layers(augmentation, seed) if augmentation else None
    train = image_dataset(
        table.split("train"), table.classes, size, batch, shuffle_seed=seed, augment=augment
    )
    val_frame = table.split("val")
    validation = None if val_frame.empty else image_dataset(val_frame, table.classes, size, batch)
    return train, validation
