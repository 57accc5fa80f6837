"""What the data checks read from each image's pixels, in one decoding pass: a hash of the exact
pixels, how far from blank it is, and a small blurred copy that near-duplicates share."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

# Near-duplicates are compared as grey images of DESCRIPTOR_SIZE px, blurred with a Gaussian of
# BLUR_SIGMA px. The blur is what makes the comparison work: resampling and JPEG change the
# finest detail of a copy, and Gaussian smoothing takes exactly that detail out of both images,
# while distinct images still differ in their shapes (docs/data-checks.md compares it with
# perceptual hashes and frozen features; bench/data_checks.py measures it on planted copies).
DESCRIPTOR_SIZE = 28
BLUR_SIGMA = 1.2
# Images of more pixels than this are decoded in threads.
_THREADS_FROM = 256 * 256


@dataclass(frozen=True)
class PixelSummary:
    """One row per image, in the order the paths were given.

    `digest`: sha256 of the decoded pixels, their mode (grey or RGB) and size; equal for the
    same picture saved under another name or in another lossless format (a grey picture saved
    as RGB differs here; the near-duplicate check finds it, at similarity 1). `spread`: the
    standard deviation of the grey thumbnail's values (0-255), 0 for a constant image; the
    thumbnail rather than the full image, which averages away a blank photo's sensor noise and
    costs nothing (Pillow's ImageStat took 0.6 s for the demo). `descriptor`: the blurred grey
    thumbnail,
    centred and scaled to unit length, so that a dot product is a correlation (a zero row for a
    constant image).
    """

    digest: np.ndarray
    spread: np.ndarray
    descriptor: np.ndarray

    @classmethod
    def none(cls, count: int) -> PixelSummary:
        """A stand-in for `count` images whose pixels no check reads: every one distinct."""
        return cls(
            digest=np.array([str(row) for row in range(count)], dtype=object),
            spread=np.full(count, np.inf, dtype=np.float32),
            descriptor=np.zeros((count, DESCRIPTOR_SIZE * DESCRIPTOR_SIZE), dtype=np.float32),
        )


def summarize_pixels(paths: Sequence[str]) -> PixelSummary:
    """Decode every image once and summarize its pixels.

    Threads overlap the decoding of large images; for small ones (Fashion-MNIST's 28 px) the
    Python around each decode dominates and threads only contend for the interpreter: 1.6 s
    in one thread against 3.7 s in two for the demo's 11,500 images.
    """
    chunks = [paths[start : start + 256] for start in range(0, len(paths), 256)]
    digests: list[str] = []
    thumbnails: list[np.ndarray] = []
    workers = (os.cpu_count() or 1) if paths and _pixel_count(paths[0]) > _THREADS_FROM else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for rows in pool.map(_summarize_chunk, chunks):
            for digest, thumbnail in rows:
                digests.append(digest)
                thumbnails.append(thumbnail)
    size = DESCRIPTOR_SIZE * DESCRIPTOR_SIZE
    stacked = (
        np.stack(thumbnails).astype(np.float32)
        if thumbnails
        else np.zeros((0, DESCRIPTOR_SIZE, DESCRIPTOR_SIZE), dtype=np.float32)
    )
    blurred = gaussian_filter(stacked, (0, BLUR_SIGMA, BLUR_SIGMA))
    descriptor = blurred.reshape(len(stacked), size)
    descriptor -= descriptor.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(descriptor, axis=1, keepdims=True)
    descriptor = np.divide(descriptor, norms, out=np.zeros_like(descriptor), where=norms > 1e-3)
    return PixelSummary(
        digest=np.array(digests, dtype=object),
        spread=stacked.reshape(len(stacked), -1).std(axis=1),
        descriptor=descriptor.astype(np.float32),
    )


def _pixel_count(path: str) -> int:
    with Image.open(path) as image:
        return image.width * image.height


def _summarize_chunk(paths: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    return [_summarize(path) for path in paths]


def _summarize(path: str) -> tuple[str, np.ndarray]:
    with Image.open(path) as opened:
        opened.load()
        image = opened if opened.mode in ("L", "RGB") else opened.convert("RGB")
    digest = hashlib.sha256(f"{image.mode} {image.size}".encode())
    digest.update(image.tobytes())
    grey = image if image.mode == "L" else image.convert("L")
    if max(grey.size) > 4 * DESCRIPTOR_SIZE:  # a large photo: shrink in cheap steps first
        grey = grey.reduce(max(1, min(grey.size) // (2 * DESCRIPTOR_SIZE)))
    thumbnail = grey.resize((DESCRIPTOR_SIZE, DESCRIPTOR_SIZE), Image.Resampling.BICUBIC)
    pixels = np.frombuffer(thumbnail.tobytes(), dtype=np.uint8).reshape(
        DESCRIPTOR_SIZE, DESCRIPTOR_SIZE
    )
    return digest.hexdigest(), pixels
