"""Long work shows progress: a log line per epoch, and a bar over long forward passes on a terminal."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import re
import select
import struct
import sys
import termios
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tasks.inference.forward import forward_pass
from tasks.stages.fitting import train_head


def test_each_epoch_logs_its_stage_loss_and_validation_scores(
    caplog: pytest.LogCaptureFixture,
) -> None:
    keras.utils.set_random_seed(0)
    head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(24, 4)).astype(np.float32), rng.integers(0, 3, 24)
    with caplog.at_level(logging.INFO):  # outside a Prefect run: standard logging
        history = train_head(
            head,
            (features, labels),
            (features[:6], labels[:6]),
            epochs=3,
            learning_rate=1e-3,
            patience=5,
            batch_size=8,
            seed=0,
            stage="feature_extraction",
        )
    lines = [r.getMessage() for r in caplog.records if " epoch " in r.getMessage()]
    assert len(lines) == history.epochs_run == 3
    number = r"\d+\.\d{4}"
    for epoch, line in enumerate(lines, 1):
        assert re.fullmatch(
            rf"feature_extraction epoch {epoch}/3: loss {number}, accuracy {number}, "
            rf"val_loss {number}, val_accuracy {number}",
            line,
        ), line
    assert f"val_loss {history.epochs['val_loss'][-1]:.4f}" in lines[-1]


def slow_dataset(batches: int, pause: float) -> tf.data.Dataset:
    """(images, labels) batches of 4 that take `pause` seconds each, as a long pass would."""

    def generate():
        for index in range(batches):
            time.sleep(pause)
            yield np.full((4, 8, 8, 3), index, np.float32), np.arange(4, dtype=np.int32)

    spec = (tf.TensorSpec((None, 8, 8, 3), tf.float32), tf.TensorSpec((None,), tf.int32))
    return tf.data.Dataset.from_generator(generate, output_signature=spec)


def pooled_model() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))


def test_a_long_pass_draws_a_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    with os.fdopen(terminal, "w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        forward_pass(pooled_model(), slow_dataset(6, 0.5), 24, "features: train")
        stderr.flush()
        shown = b""
        while select.select([controller], [], [], 0.5)[0]:
            shown += os.read(controller, 65536)
    os.close(controller)
    assert "features: train" in shown.decode() and "24/24" in shown.decode()


def test_no_bar_where_output_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = io.StringIO()  # a log file, CI, a pipe
    monkeypatch.setattr(sys, "stderr", stderr)
    forward_pass(pooled_model(), slow_dataset(6, 0.5), 24, "features: train")
    assert stderr.getvalue() == ""
