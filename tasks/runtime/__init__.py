"""What every run stands on: servers and their time budgets, credentials, run names and logs, Keras internals."""
