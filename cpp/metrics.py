"""Clustering quality against ground truth: accuracy under the best matching (Hungarian), NMI, ARI."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import linear_sum_assignment


def _contingency(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """Counts ``M[i, j]`` of samples with true class ``i`` and predicted cluster ``j`` (labels re-indexed)."""
    t, p = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    if t.size == 0:
        raise ValueError("cannot score an empty clustering")
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    m = np.zeros((ti.max() + 1, pi.max() + 1), dtype=np.int64)
    np.add.at(m, (ti, pi), 1)
    return m


def clustering_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of samples correctly labelled under the best one-to-one cluster→class map."""
    m = _contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(-m)
    return float(m[rows, cols].sum() / m.sum())


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Normalised mutual information, I(T;P) / mean(H(T), H(P)) (1.0 when both are a single cluster)."""
    m = _contingency(y_true, y_pred).astype(np.float64)
    n = m.sum()
    h_t, h_p = _entropy(m.sum(1)), _entropy(m.sum(0))
    if h_t == 0.0 and h_p == 0.0:
        return 1.0
    nz = m > 0
    outer = np.outer(m.sum(1), m.sum(0))
    mi = float((m[nz] / n * np.log(m[nz] * n / outer[nz])).sum())
    return max(0.0, mi / (0.5 * (h_t + h_p)))


def ari(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Adjusted Rand index (1 for identical partitions, ≈0 for random ones, can be negative)."""
    m = _contingency(y_true, y_pred).astype(np.float64)

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    n = m.sum()
    index, rows, cols = pairs(m), pairs(m.sum(1)), pairs(m.sum(0))
    expected = rows * cols / (n * (n - 1) / 2) if n > 1 else 0.0
    maximum = 0.5 * (rows + cols)
    if maximum == expected:
        return 1.0
    return float((index - expected) / (maximum - expected))


def evaluate(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """``{"acc", "nmi", "ari"}`` of a predicted clustering."""
    return {
        "acc": clustering_accuracy(y_true, y_pred),
        "nmi": nmi(y_true, y_pred),
        "ari": ari(y_true, y_pred),
    }
