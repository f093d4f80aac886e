"""Nearest neighbours by inner product on L2-normalised features (faiss), excluding each point itself."""

from __future__ import annotations

import faiss
import numpy as np

# Above this many points an exact search (N² d) is too slow on CPU; an IVF index is used instead.
EXACT_MAX = 60_000


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """``x`` as float32 with unit-norm rows (zero rows stay zero); no copy when it already is."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.all(np.abs(norms - 1.0) < 1e-4):
        return x
    return x / np.maximum(norms, 1e-12)


def knn_indices(
    features: np.ndarray, k: int, *, chunk_size: int = 16384, exact_max: int = EXACT_MAX, seed: int = 0
) -> np.ndarray:
    """``(N, k)`` int64 indices of each row's ``k`` nearest other rows by cosine similarity.

    Exact (flat inner-product index) up to ``exact_max`` rows; above it an IVF index with
    ``≈4√N`` lists trained on a sample and 16 probes. Queries run in chunks; memory stays O(N·(d + k)).
    """
    n = features.shape[0]
    if k < 1:
        return np.zeros((n, 0), dtype=np.int64)
    if n <= k:
        raise ValueError(f"need more than k={k} points for a k-nearest-neighbour graph, got {n}")
    x = normalize_rows(features)
    index = build_index(x, exact_max=exact_max, seed=seed)
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        out[start:stop] = search_excluding(index, x[start:stop], np.arange(start, stop), k)
    return out


def build_index(x: np.ndarray, *, exact_max: int = EXACT_MAX, seed: int = 0) -> faiss.Index:
    """An inner-product index over unit rows ``x``: exact up to ``exact_max`` rows, else IVF (16 probes)."""
    n, d = x.shape
    index: faiss.Index
    if n <= exact_max:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * np.sqrt(n))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        index.train(x[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))])
        index.nprobe = 16
    index.add(x)
    return index


def search_excluding(index: faiss.Index, queries: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """``(len(queries), k)`` nearest indexed rows of each query, leaving out its own position ``own``
    (``-1`` for queries that are not in the index)."""
    _, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), k + 1)
    return _drop_self(idx, own, k)


def _drop_self(idx: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """From ``k + 1`` neighbours per row, drop the row itself (or the last one when self is absent)."""
    is_self = idx == own[:, None]
    # Rows where self was not returned (ties, approximate search): drop the last neighbour instead.
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    # Guard against faiss's -1 padding when an IVF probe returns too few results: repeat the row itself
    # (or, for a query outside the index, its nearest hit).
    kept = idx[~is_self].reshape(len(idx), k)
    fill = np.where(own >= 0, own, np.maximum(kept[:, 0], 0))
    return np.where(kept < 0, fill[:, None], kept)
