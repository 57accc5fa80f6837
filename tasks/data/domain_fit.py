"""How well a set of features fits its labels before any training: LogME (You et al., ICML 2021),
the evidence a Bayesian linear model from the features to each one-hot label gives the labels."""

from __future__ import annotations

import numpy as np

_ITERATIONS = 100


def logme(features: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """LogME of `features` (rows, standardized here) for integer `labels`: the log marginal
    evidence per image of the labels under a linear model with Gaussian prior and noise, each
    precision chosen to maximize it, averaged over the one-hot columns of the classes.

    Higher is better; it is comparable between feature sets of the same images and labels.
    Standardizing makes it indifferent to the scale of each feature, so bases with larger or
    smaller activations are compared on their information alone. Features that never vary
    score as a model with no features: the labels explained by noise alone.
    """
    rows = np.asarray(features, dtype=np.float64)
    count, width = rows.shape
    spread = rows.std(axis=0)
    rows = (rows - rows.mean(axis=0)) / np.where(spread > 1e-12, spread, 1.0)
    rows[:, spread <= 1e-12] = 0.0
    # Only the directions the features span matter: the eigenvectors of the smaller Gram matrix.
    if count > width:
        sigma, vectors = np.linalg.eigh(rows.T @ rows)
        keep = sigma > 1e-8 * max(float(sigma.max()), 1e-300)
        sigma = sigma[keep]
        basis = (rows @ vectors[:, keep]) / np.sqrt(sigma)  # count x rank, orthonormal columns
    else:
        left, singular, _ = np.linalg.svd(rows, full_matrices=False)
        keep = singular > 1e-6 * max(float(singular.max()), 1e-300)
        basis, sigma = left[:, keep], singular[keep] ** 2
    evidences = [
        _evidence(
            basis.T @ (labels == k).astype(np.float64),
            float((labels == k).sum()),
            sigma,
            count,
            width,
        )
        for k in range(num_classes)
    ]
    return float(np.mean(evidences))


def _evidence(
    projected: np.ndarray, energy: float, sigma: np.ndarray, count: int, width: int
) -> float:
    """The maximized log evidence per image of one 0/1 target whose projection on the features'
    basis is `projected` and whose squared length is `energy`."""
    z2 = projected**2
    outside = max(energy - float(z2.sum()), 0.0)  # the part of the target no feature reaches
    alpha, beta = 1.0, 1.0
    for _ in range(_ITERATIONS if len(sigma) else 1):
        shrink = alpha + beta * sigma
        gamma = float((beta * sigma / shrink).sum())
        weights2 = float((beta**2 * sigma * z2 / shrink**2).sum())
        residual2 = float(((alpha / shrink) ** 2 * z2).sum()) + outside
        beta_next = (count - gamma) / (residual2 + 1e-5)
        alpha_next = gamma / (weights2 + 1e-5) if len(sigma) else 1.0
        settled = abs(alpha_next / beta_next - alpha / beta) <= 1e-3 * alpha / beta
        alpha, beta = alpha_next, beta_next
        if settled:
            break
    shrink = alpha + beta * sigma
    weights2 = float((beta**2 * sigma * z2 / shrink**2).sum())
    residual2 = float(((alpha / shrink) ** 2 * z2).sum()) + outside
    log_det = float(np.log(shrink).sum()) + (width - len(sigma)) * np.log(alpha)
    evidence = (
        count / 2 * np.log(beta)
        + width / 2 * np.log(alpha)
        - count / 2 * np.log(2 * np.pi)
        - beta / 2 * residual2
        - alpha / 2 * weights2
        - log_det / 2
    )
    return float(evidence / count)
