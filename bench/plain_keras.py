"""The script a user would write by hand: same data, base, head, epochs and stages; no Prefect,
MLflow or DVC, and no feature cache (the frozen base runs on every image in every epoch).

Run: python bench/plain_keras.py [conf/default.yaml]
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import keras
import pandas as pd
import tensorflow as tf
import yaml


def dataset(frame: pd.DataFrame, classes: list[str], size: int, batch: int, shuffle: bool):
    paths = frame["path"].tolist()
    labels = [classes.index(label) for label in frame["label"]]
    data = tf.data.Dataset.from_tensor_slices((paths, labels))
    if shuffle:
        data = data.shuffle(len(paths), seed=0, reshuffle_each_iteration=True)

    def load(path, label):
        image = tf.io.decode_png(tf.io.read_file(path), channels=3)
        return tf.image.resize(tf.cast(image, tf.float32), (size, size)), label

    return data.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(2)


def main(config_path: str = "conf/default.yaml") -> dict[str, float]:
    started = time.perf_counter()
    config = yaml.safe_load(Path(config_path).read_text())
    root = Path(config_path).resolve().parents[1]
    size, batch = config["data"]["image_size"], config["data"]["batch_size"]
    manifest = root / config["data"]["path"]
    frame = pd.read_csv(manifest)
    frame["path"] = [str(manifest.parent / p) for p in frame["path"]]
    classes = sorted(frame["label"].unique())
    train, val, test = (
        dataset(frame[frame.split == s], classes, size, batch, s == "train")
        for s in ("train", "val", "test")
    )

    keras.utils.set_random_seed(config["seed"])
    base = keras.applications.MobileNet(
        include_top=False,
        weights="imagenet",
        input_shape=(size, size, 3),
        **config["base"]["options"],
    )
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = keras.applications.mobilenet.preprocess_input(inputs)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(config["head"]["dropout"])(x)
    outputs = keras.layers.Dense(len(classes), activation="softmax")(x)
    model = keras.Model(inputs, outputs)

    def fit(rate: float, epochs: int, patience: int) -> None:
        model.compile(
            optimizer=keras.optimizers.Adam(rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        stop = keras.callbacks.EarlyStopping(patience=patience, restore_best_weights=True)
        model.fit(
            train, validation_data=val, epochs=epochs, callbacks=[stop], verbose=0, shuffle=False
        )

    accuracies = {}
    head = config["feature_extraction"]
    fit(head["learning_rate"], head["epochs"], head["patience"])
    accuracies["feature_extraction"] = model.evaluate(test, verbose=0)[1]
    rate = head["learning_rate"]
    for number, stage in enumerate(config["fine_tune"]["stages"], 1):
        rate *= config["fine_tune"]["lr_factor"]
        base.trainable = True
        first = 14 - stage["unfreeze_blocks"]  # MobileNet's blocks are conv_{dw,pw}_1..13
        for layer in base.layers:
            block = re.match(r"conv_(?:dw|pw|pad)_(\d+)", layer.name)
            unfrozen = block is not None and int(block.group(1)) >= first
            layer.trainable = unfrozen and not isinstance(layer, keras.layers.BatchNormalization)
        fit(rate, stage["epochs"], config["fine_tune"]["patience"])
        accuracies[f"fine_tune_{number}"] = model.evaluate(test, verbose=0)[1]
    accuracies["seconds"] = time.perf_counter() - started
    return accuracies


if __name__ == "__main__":
    result = main(*sys.argv[1:])
    print(" ".join(f"{k}={v:.4f}" for k, v in result.items()))
