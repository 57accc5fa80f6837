"""The pipeline's stages: one file per kind (head on frozen features, fine-tuning the top blocks,
from scratch), all of one shape, and the runner that resumes or trains a list of them."""
