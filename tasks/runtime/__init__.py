"""What every run stands on: servers and time budgets, credentials, stop signals, run names and logs, Keras internals."""
