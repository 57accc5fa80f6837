"""Likely wrong labels, found by cleanlab on out-of-fold probabilities of a linear model fitted
to frozen features: no forward pass beyond the one training makes anyway."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from cleanlab.filter import find_label_issues
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict

# Strong regularisation and few iterations: the probabilities only need to rank the labels. On
# a planted set like bench/data_checks.py's (5 % of 11,900 labels flipped), 20 iterations found
# 93 % of the flips at 1.7 s; 50 and 100 found 92 % at 4.1 s and 6.3 s.
_C = 0.1
_MAX_ITER = 20


@dataclass(frozen=True)
class LabelIssues:
    """Rows (of the features given) whose label is likely wrong, most likely first, with the
    label the model suggests and its out-of-fold probability of the given label.

    `skipped` says why nothing was checked (a class too small to cross-validate), else None.
    """

    rows: np.ndarray
    suggested: np.ndarray
    given_probability: np.ndarray
    skipped: str | None = None


def find_likely_label_errors(
    features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int, seed: int
) -> LabelIssues:
    """cleanlab's `find_label_issues` (pruned by noise rate, ranked by self-confidence) on the
    out-of-fold class probabilities of a logistic regression on standardized `features`."""
    counts = np.bincount(labels, minlength=num_classes)
    smallest = int(counts.min()) if len(counts) else 0
    if num_classes < 2 or smallest < 2:
        return _skipped(
            f"a class has {smallest} image(s); cross-validation needs at least 2 per class"
        )
    folds = min(folds, smallest)
    spread = features.std(axis=0)
    standardized = (features - features.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probabilities = cross_val_predict(
            LogisticRegression(C=_C, max_iter=_MAX_ITER),
            standardized,
            labels,
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
            method="predict_proba",
        )
    ranked = find_label_issues(
        labels,
        probabilities,
        filter_by="prune_by_noise_rate",
        return_indices_ranked_by="self_confidence",
        # In this process: cleanlab's pool shares its inputs through module globals, which a
        # spawned worker (a Prefect process worker's flow) does not have, and forking a process
        # that holds TensorFlow is unsafe.
        n_jobs=1,
    )
    ranked = np.asarray(ranked, dtype=np.int64)
    return LabelIssues(
        rows=ranked,
        suggested=probabilities[ranked].argmax(axis=1),
        given_probability=probabilities[ranked, labels[ranked]],
    )


def _skipped(reason: str) -> LabelIssues:
    empty = np.zeros(0, dtype=np.int64)
    return LabelIssues(empty, empty, np.zeros(0), skipped=reason)
