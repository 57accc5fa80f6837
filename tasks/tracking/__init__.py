"""What MLflow records of a run: parent and stage runs, checkpoints, liveness of their owners."""
