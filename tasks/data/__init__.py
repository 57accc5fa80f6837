"""The images: the pinned version pulled with DVC, listed, split, decoded and streamed; the demo dataset."""
