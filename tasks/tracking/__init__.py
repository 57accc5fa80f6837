"""What MLflow records of a run: parent and stage runs, checkpoints, heartbeats, what a stage leaves."""
