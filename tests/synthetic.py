"""Synthetic features for tests: a mixture of low-dimensional subspaces."""

from __future__ import annotations

import numpy as np


def subspace_mixture(n: int, d: int, k: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm points on ``k`` random ``dim``-dimensional subspaces of R^d, plus a common offset."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    bases = np.linalg.qr(rng.standard_normal((k, d, dim)))[0]
    x = np.einsum("ndr,nr->nd", bases[labels], rng.standard_normal((n, dim)))
    x += 0.5 * rng.standard_normal(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels
