"""Synthetic features for tests: a mixture of low-dimensional subspaces, in memory or as a feature store."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpp.store import FeatureStore, IndexEntry, StoreWriter


def subspace_mixture(n: int, d: int, k: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm points on ``k`` random ``dim``-dimensional subspaces of R^d, plus a common offset."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    bases = np.linalg.qr(rng.standard_normal((k, d, dim)))[0]
    x = np.einsum("ndr,nr->nd", bases[labels], rng.standard_normal((n, dim)))
    x += 0.5 * rng.standard_normal(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def write_store(path: Path, x: np.ndarray, chunk_size: int, dtype: str = "float32") -> FeatureStore:
    """A complete feature store holding the rows of ``x`` in chunks of ``chunk_size``."""
    identity = {"encoder_id": "synthetic", "encoder_weights": None, "source": {"path": str(path)}}
    settings = {"chunk_size": chunk_size, "dtype": dtype, "dim": x.shape[1], "max_pixels": 1}
    writer = StoreWriter.open(path, identity, settings)
    for start in range(0, len(x), chunk_size):
        block = x[start : start + chunk_size]
        writer.write_chunk(
            block, [IndexEntry(f"row{i}", None, item=i) for i in range(start, start + len(block))]
        )
    return writer.finish()
