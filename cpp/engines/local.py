"""The local engine: decoding in DataLoader worker processes (or inline), encoding in this process.

Unit ``u`` goes to worker ``u % workers`` and the DataLoader returns units round-robin, i.e. in order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cpp.encoders.base import Encoder
from cpp.engines.base import DecodedUnit, EmbedEngine, EncodedUnit, decode_unit, encode_unit
from cpp.engines.registry import register_engine
from cpp.sources import Item


def default_workers(device: torch.device) -> int:
    """Decode worker processes. On a 2-core CPU machine none: decoding inline between batches beat one
    worker competing with the inference threads (0.88 vs 0.82 of the bare forward, docs/benchmarks.md);
    more cores get up to 4 beside inference; CUDA gets as many as the cores allow (up to 8)."""
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return 0 if cores <= 2 else max(1, min(4, cores // 4))


class _UnitDataset(IterableDataset[DecodedUnit]):
    """Yields decoded units in order, sharded across DataLoader workers by unit."""

    def __init__(
        self,
        items: Sequence[Item],
        units: list[tuple[int, int]],
        preprocess: Callable[[Image.Image], torch.Tensor],
        max_pixels: int,
    ) -> None:
        self.items = items
        self.units = units
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __iter__(self) -> Iterator[DecodedUnit]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for number in range(worker, len(self.units), workers):
            start, end = self.units[number]
            yield decode_unit(self.items, start, end, self.preprocess, self.max_pixels)


def _collate_unit(unit: DecodedUnit) -> DecodedUnit:
    return unit


class LocalEngine(EmbedEngine):
    """Decode with ``workers`` processes (``None``: :func:`default_workers`; 0: inline), encode here."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        if workers is not None and workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = workers
        self._resolved: int | None = None

    def run(
        self, items: Sequence[Item], units: list[tuple[int, int]], encoder: Encoder, max_pixels: int
    ) -> Generator[EncodedUnit, None, None]:
        workers = default_workers(encoder.device) if self.workers is None else self.workers
        self._resolved = workers
        loader = DataLoader(
            _UnitDataset(items, units, encoder.preprocess, max_pixels),
            batch_size=None,
            num_workers=workers,
            collate_fn=_collate_unit,  # type: ignore[arg-type]  # batch_size=None: one unit per call
            pin_memory=encoder.device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None,
        )
        for unit in loader:
            yield encode_unit(unit, encoder)

    def describe(self) -> dict[str, object]:
        return {"engine": self.name, "workers": self.workers if self._resolved is None else self._resolved}


@register_engine("local")
def local_engine(*, workers: int | None = None) -> LocalEngine:
    """Decode on this machine's CPUs (``workers`` processes; default by device), encode on its device."""
    return LocalEngine(workers)
