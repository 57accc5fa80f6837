"""The pipeline's stages: the config's checks, one file per kind, their plan, Keras fitting, and the runner."""
