"""A read-only feature matrix that is either in memory or an on-disk :class:`~cpp.store.FeatureStore`.

Fit, readout and naming read features through this view: in blocks (streamed, one block in memory at a
time) and by row indices (samples), so a store larger than memory is never loaded whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeAlias

import numpy as np

from cpp.store import FeatureStore

#: What the clustering functions accept: an ``(N, d)`` array or a feature store.
FeatureInput: TypeAlias = "np.ndarray | FeatureStore"

#: Rows per block when streaming an in-memory array.
BLOCK_ROWS = 65536


class FeatureMatrix:
    """Rows of ``data`` as float32, by block or by index."""

    def __init__(self, data: FeatureInput) -> None:
        if isinstance(data, FeatureStore):
            self._store: FeatureStore | None = data
            self._array: np.ndarray | None = None
            self.shape: tuple[int, int] = (len(data), data.dim)
        else:
            if data.ndim != 2:
                raise ValueError(f"features must be a 2-D array, got shape {data.shape}")
            self._store, self._array = None, data
            self.shape = (int(data.shape[0]), int(data.shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def dim(self) -> int:
        return self.shape[1]

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, float32 block)`` covering every row in order."""
        if self._store is not None:
            yield from self._store.iter_blocks()
            return
        assert self._array is not None
        for start in range(0, len(self), BLOCK_ROWS):
            yield start, np.asarray(self._array[start : start + BLOCK_ROWS], dtype=np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 rows at the given indices."""
        if self._store is not None:
            return self._store.take(rows)
        assert self._array is not None
        return np.asarray(self._array[rows], dtype=np.float32)

    def all(self) -> np.ndarray:
        """Every row as one float32 array (only for data known to fit in memory)."""
        if self._array is not None:
            return np.asarray(self._array, dtype=np.float32)
        return self.take(np.arange(len(self)))


def as_matrix(data: FeatureInput | FeatureMatrix) -> FeatureMatrix:
    """``data`` as a :class:`FeatureMatrix` (returned as is when it already is one)."""
    return data if isinstance(data, FeatureMatrix) else FeatureMatrix(data)
