"""The batch prediction flow: find images -> load the registered model -> predict -> write CSV."""

from __future__ import annotations

from prefect import flow

from tasks.registry.predict import (
    PredictionResult,
    list_images_step,
    load_serving_model_step,
    predict_images_step,
    write_predictions_step,
)


@flow(name="predict-folder", log_prints=True)
def predict_folder(
    model_uri: str,
    images: str,
    output: str = "predictions.csv",
    batch_size: int = 64,
    tracking_uri: str | None = None,
) -> PredictionResult:
    """Label every image under `images` with a registered model; write path,label,probability.

    `model_uri` is an MLflow URI such as `models:/NAME@champion`; `tracking_uri` defaults to
    MLFLOW_TRACKING_URI, else the MLflow store of the project holding the current directory.
    """
    paths = list_images_step(images)
    model = load_serving_model_step(model_uri, tracking_uri)
    predictions = predict_images_step(model, paths, batch_size)
    return write_predictions_step(predictions, output, model)
