"""Package a trained classifier for serving: an MLflow pyfunc that takes image files and names classes.

`mlflow models serve -m models:/NAME@champion` then answers each image with its label, the
label's probability and every class's probability (docs/serving.md). The Keras model stays
inside, loadable with `tasks.registry.versions.keras_model_of`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from tasks.registry.serving_model import (
    CLASSES_ARTIFACT,
    IMAGE_COLUMN,
    KERAS_MODEL_ARTIFACT,
    LABEL_COLUMN,
    PROBABILITY_COLUMN,
    ImageClassifier,
)
from tasks.runtime.tracking_server import using_tracking_uri
from tasks.tracking.stage_runs import model_requirements

SERVING_MODEL_NAME = "serving_model"
# What the serving model imports from the project, relative to tasks/: shipped with it as its code.
_SHIPPED_MODULES = (
    "__init__.py",
    "data/__init__.py",
    "data/decoding.py",
    "inference/__init__.py",
    "inference/forward.py",
    "registry/__init__.py",
    "registry/serving_model.py",
)


class ClassNameClashError(ValueError):
    """A class is named like one of the serving model's own output columns."""


def serving_signature(classes: Sequence[str]):
    """Image file bytes in (base64 in JSON); label, probability and one column per class out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec

    outputs: list[ColSpec | TensorSpec] = [
        ColSpec(DataType.string, LABEL_COLUMN),
        ColSpec(DataType.double, PROBABILITY_COLUMN),
        *(ColSpec(DataType.double, name) for name in classes),
    ]
    return ModelSignature(Schema([ColSpec(DataType.binary, IMAGE_COLUMN)]), Schema(outputs))


def log_serving_model(
    uri: str, run_id: str, keras_model_uri: str, classes: Sequence[str], example_image: Path
) -> str:
    """Log the Keras model at `keras_model_uri` wrapped for serving, on run `run_id`; its URI.

    `example_image` (one real image file) becomes the input example that the MLflow UI and
    `serving_input_example.json` show.
    """
    import mlflow.pyfunc
    from mlflow import MlflowClient
    from mlflow.models import Model
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    clash = {LABEL_COLUMN, PROBABILITY_COLUMN} & set(classes)
    if clash:
        raise ClassNameClashError(
            f"a class is named {', '.join(sorted(clash))}, like a column the serving model "
            "answers with; rename that class folder"
        )
    with tempfile.TemporaryDirectory(prefix="serving-model-") as folder:
        staging = Path(folder)
        (staging / "classes.json").write_text(json.dumps(list(classes)))
        example = pd.DataFrame({IMAGE_COLUMN: [example_image.read_bytes()]})
        # models:/ URIs resolve against the tracking store's registry. The logged model is
        # made in the run's experiment and logged by id: Model.log alone would put it in the
        # default experiment, and re-opening a finished run with start_run would mark it
        # running again and move its end time.
        with using_tracking_uri(uri):
            keras_model = mlflow.artifacts.download_artifacts(
                artifact_uri=keras_model_uri, dst_path=str(staging / "keras")
            )
            client = MlflowClient(uri)
            experiment_id = client.get_run(run_id).info.experiment_id
            note = (
                f"The Keras model {keras_model_uri} wrapped for `mlflow models serve`: image "
                f"files in (column `{IMAGE_COLUMN}`); `{LABEL_COLUMN}`, `{PROBABILITY_COLUMN}` "
                "and one column per class out (docs/serving.md)."
            )
            logged = client.create_logged_model(
                experiment_id, SERVING_MODEL_NAME, run_id, tags={MLFLOW_RUN_NOTE: note}
            )
            info = Model.log(
                None,  # artifact_path, deprecated for `name`
                flavor=_PYFUNC_WITHOUT_EXAMPLE_CHECK,
                validate_serving_input=False,
                name=SERVING_MODEL_NAME,
                run_id=run_id,
                model_id=logged.model_id,
                python_model=ImageClassifier(),
                artifacts={
                    KERAS_MODEL_ARTIFACT: keras_model,
                    CLASSES_ARTIFACT: str(staging / "classes.json"),
                },
                code_paths=[str(_shipped_code(staging))],
                signature=serving_signature(classes),
                input_example=example,
                pip_requirements=model_requirements(),
            )
    return info.model_uri


def _save_pyfunc(*, validate_serving_input: bool, **kwargs) -> None:
    import mlflow.pyfunc

    mlflow.pyfunc.save_model(**kwargs)


# mlflow.pyfunc as Model.log's flavor, minus its check of the input example: Model.log would load
# the saved model back and score the example, most of the time a log takes, and the gate's load
# check does the same from the registry right after. Model.log reads `validate_serving_input`
# from the flavor's arguments (the transformers flavor passes it); pyfunc.save_model refuses it.
_PYFUNC_WITHOUT_EXAMPLE_CHECK = SimpleNamespace(__name__="mlflow.pyfunc", save_model=_save_pyfunc)


def _shipped_code(staging: Path) -> Path:
    """A `tasks` package holding only the modules the serving model imports."""
    package = staging / "code" / "tasks"
    package.mkdir(parents=True)
    tasks = Path(__file__).parents[1]
    for module in _SHIPPED_MODULES:
        (package / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tasks / module, package / module)
    return package
