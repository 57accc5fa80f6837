"""What a finished run tells its user: the Prefect summary artifact, DVC metrics and plots."""
