"""Copies among the images: the same pixels, near-copies (re-encoded, resized), and copies that
carry different labels. A copy in another split is a leak."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tasks.data.pixels import DESCRIPTOR_SIZE, PixelSummary

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
# Candidates are found on a half-size copy of the descriptor (four times fewer values to
# multiply), with this much slack below the threshold; each is then measured in full.
_CANDIDATE_SLACK = 0.01
_ROWS_PER_BLOCK = 1024


@dataclass(frozen=True)
class Pair:
    """Two images (row numbers of the table's frame) that are copies, and how alike they are."""

    first: int
    second: int
    similarity: float


def exact_pairs(summary: PixelSummary) -> list[Pair]:
    """Each image paired with the first image of the same pixels (in table order)."""
    first_of: dict[str, int] = {}
    pairs = []
    for row, digest in enumerate(summary.digest):
        if digest in first_of:
            pairs.append(Pair(first_of[digest], row, 1.0))
        else:
            first_of[digest] = row
    return pairs


def near_pairs(summary: PixelSummary, threshold: float, exact: list[Pair]) -> list[Pair]:
    """Pairs of different pixels whose blurred grey thumbnails correlate at `threshold` or more.

    Every pair is compared (a matrix product in blocks of rows); only the first image of each
    set of exact copies takes part, and constant images none (they correlate with nothing).
    """
    copies = {pair.second for pair in exact}
    rows = np.array(
        [
            row
            for row in range(len(summary.descriptor))
            if row not in copies and summary.descriptor[row].any()
        ],
        dtype=np.int64,
    )
    if len(rows) < 2:
        return []
    full = summary.descriptor[rows]
    small = _halved(full)
    pairs = []
    for start in range(0, len(rows), _ROWS_PER_BLOCK):
        block = small[start : start + _ROWS_PER_BLOCK]
        similar = block @ small[start:].T  # only pairs (i, j) with i <= j
        local, other = np.nonzero(similar >= threshold - _CANDIDATE_SLACK)
        keep = other > local  # drop the diagonal and pairs below it
        first, second = local[keep] + start, other[keep] + start
        if not len(first):
            continue
        exact_similarity = np.einsum("ij,ij->i", full[first], full[second])
        for i, j, value in zip(first, second, exact_similarity, strict=True):
            if value >= threshold:
                pairs.append(Pair(int(rows[i]), int(rows[j]), float(value)))
    return pairs


def _halved(descriptor: np.ndarray) -> np.ndarray:
    """Each descriptor averaged over 2 x 2 pixels, centred and scaled to unit length again."""
    size = DESCRIPTOR_SIZE
    squares = descriptor.reshape(len(descriptor), size // 2, 2, size // 2, 2).mean(axis=(2, 4))
    flat = squares.reshape(len(descriptor), -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return np.divide(flat, norms, out=np.zeros_like(flat), where=norms > 1e-6)


def duplicate_rows(
    frame: pd.DataFrame, pairs: list[Pair], check: str, paths: list[str]
) -> Iterator[dict]:
    """One finding per image of each pair: the other image, and whether the pair is a leak.

    `droppable` marks the image `drop` removes: for a leak the one in the earlier split of
    train, val, test (test images are never dropped, so the test set stays the champion's
    yardstick); for two copies in training, the second.
    """
    splits = frame["split"].to_numpy()
    for pair in pairs:
        a, b = pair.first, pair.second
        leak = splits[a] != splits[b]
        if leak:
            drop = a if SPLIT_ORDER[splits[a]] < SPLIT_ORDER[splits[b]] else b
        else:
            drop = b if splits[b] != "test" else -1
        how = "same pixels" if check == "exact_duplicate" else f"similarity {pair.similarity:.4f}"
        for this, other in ((a, b), (b, a)):
            kind = f"leak: copy in {splits[other]}" if leak else f"copy in {splits[other]}"
            yield {
                "row": this,
                "check": check,
                "detail": f"{kind} {paths[other]} ({how})",
                "leak": bool(leak),
                "droppable": this == drop,
                "partner": other,
                "partner_split": splits[other],
            }


def conflicting_rows(frame: pd.DataFrame, pairs: list[Pair], paths: list[str]) -> Iterator[dict]:
    """One finding per image of each pair of copies labelled differently; every copy outside
    the test split is droppable, since either label may be the wrong one."""
    labels = frame["label"].to_numpy()
    splits = frame["split"].to_numpy()
    for pair in pairs:
        a, b = pair.first, pair.second
        if labels[a] == labels[b]:
            continue
        for this, other in ((a, b), (b, a)):
            yield {
                "row": this,
                "check": "conflicting_label",
                "detail": f"labelled {labels[this]!r}; its copy {paths[other]} "
                f"({splits[other]}) is labelled {labels[other]!r}",
                "leak": False,
                "droppable": splits[this] != "test",
                "partner": other,
                "partner_split": splits[other],
            }
