"""The classifier: Keras Applications bases, their preprocessing and blocks, the head, where it computes."""
