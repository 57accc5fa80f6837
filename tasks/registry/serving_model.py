"""The registered model as MLflow serves it: image files in; label, probability, per-class probabilities out.

Logged by tasks/registry/serving.py with this module, tasks/data/decoding.py and tasks/inference/forward.py as
its code, so `mlflow models serve` and `mlflow models build-docker` need no project install.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from tasks.data.decoding import image_batches
from tasks.inference.forward import forward_pass

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
PROBABILITY_COLUMN = "probability"
KERAS_MODEL_ARTIFACT = "keras_model"
CLASSES_ARTIFACT = "classes"
# Images decoded and scored at once; a request of any size holds only this many in memory.
_BATCH_SIZE = 32


class UndecodableImageError(ValueError):
    """A request's image is not a PNG, JPEG, GIF or BMP file."""


class ImageClassifier(PythonModel):
    """The pipeline's Keras classifier behind MLflow's pyfunc interface.

    `keras_model` is the trained classifier (raw pixels in, class probabilities out) and
    `classes` its class names, both read from the model's artifacts.
    """

    def load_context(self, context) -> None:
        import mlflow.tensorflow

        self.keras_model = mlflow.tensorflow.load_model(context.artifacts[KERAS_MODEL_ARTIFACT])
        self.classes = tuple(json.loads(Path(context.artifacts[CLASSES_ARTIFACT]).read_text()))
        self.image_size = int(self.keras_model.input_shape[1])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """One row per image (file bytes in `image`): the most probable class, its probability,
        and every class's probability."""
        import tensorflow as tf

        contents = [bytes(image) for image in model_input[IMAGE_COLUMN]]
        if not contents:
            return probability_frame(np.empty((0, len(self.classes))), self.classes)
        pairs = tf.data.Dataset.from_tensor_slices(
            (tf.constant(contents, dtype=tf.string), tf.zeros(len(contents), tf.int32))
        )
        batches = image_batches(pairs, self.image_size, _BATCH_SIZE, files=False)
        try:
            probabilities, _ = forward_pass(self.keras_model, batches, len(contents))
        except tf.errors.InvalidArgumentError as error:
            # TensorFlow prefixes the reason with the name of the graph node that failed.
            reason = error.message.rsplit("}}", 1)[-1].strip().splitlines()[0]
            raise UndecodableImageError(
                f"an image in the request cannot be decoded ({reason}); send PNG, JPEG, GIF or "
                "BMP file bytes, base64-encoded in JSON"
            ) from None
        return probability_frame(probabilities, self.classes)


def probability_frame(probabilities: np.ndarray, classes: tuple[str, ...]) -> pd.DataFrame:
    """`label` and `probability` of each row's most probable class, then a column per class."""
    best = probabilities.argmax(axis=1)
    frame = pd.DataFrame(
        {
            LABEL_COLUMN: [classes[index] for index in best],
            PROBABILITY_COLUMN: probabilities[np.arange(len(best)), best].astype(np.float64),
        }
    )
    per_class = pd.DataFrame(probabilities.astype(np.float64), columns=list(classes))
    return pd.concat([frame, per_class], axis=1)
