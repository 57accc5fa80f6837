"""The MLflow model registry: registration, the promotion gate, the serving model, batch prediction, freshness."""
