"""The local engine: PIL decoding in DataLoader worker processes (or inline), encoding in this process."""

from __future__ import annotations

import functools
import os
from collections.abc import Generator, Sequence

import torch

from cpp.encoders.base import Encoder
from cpp.engines.base import EmbedEngine, EncodedUnit, decode_unit, encode_unit, load_units
from cpp.engines.registry import register_engine
from cpp.sources import Item

#: Images per forward pass on a CPU: the offline encoder's activations take about 12 MB per 224 px image, so
#: that a batch of 64 in one pass made `cpp embed` peak at 1.7 GB; in passes of 8 it peaked at 0.97 GB (16:
#: 1.05 GB). See docs/benchmarks.md, "CPU embedding on real photos".
CPU_FORWARD_BATCH = 8


def default_workers(device: torch.device) -> int:
    """Decode worker processes. On a 2-core CPU machine none: decoding inline between batches beat one
    worker competing with the inference threads (0.88 vs 0.82 of the bare forward, docs/benchmarks.md);
    more cores get up to 4 beside inference; CUDA gets as many as the cores allow (up to 8)."""
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return 0 if cores <= 2 else max(1, min(4, cores // 4))


def default_forward_batch(device: torch.device) -> int | None:
    """Images per forward pass: on a CPU at most :data:`CPU_FORWARD_BATCH`, on a GPU the whole unit."""
    return None if device.type == "cuda" else CPU_FORWARD_BATCH


class LocalEngine(EmbedEngine):
    """Decode with ``workers`` processes (``None``: :func:`default_workers`; 0: inline), encode here.

    With ``draft`` (the default), JPEGs of at least four times the encoder's resize target are decoded at
    reduced scale (:func:`~cpp.engines.base.prepare_image`; features within the tolerance measured in
    docs/benchmarks.md).
    """

    name = "local"

    def __init__(
        self, workers: int | None = None, *, draft: bool = True, forward_batch: int | None = None
    ) -> None:
        if workers is not None and workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if forward_batch is not None and forward_batch < 1:
            raise ValueError(f"forward_batch must be >= 1, got {forward_batch}")
        self.workers = workers
        self.draft = draft
        self.forward_batch = forward_batch
        self._resolved: tuple[int, int | None] | None = None

    def run(
        self, items: Sequence[Item], units: list[tuple[int, int]], encoder: Encoder, max_pixels: int
    ) -> Generator[EncodedUnit, None, None]:
        workers = default_workers(encoder.device) if self.workers is None else self.workers
        forward_batch = self.forward_batch or default_forward_batch(encoder.device)
        self._resolved = (workers, forward_batch)
        load = functools.partial(
            decode_unit,
            preprocess=encoder.preprocess,
            max_pixels=max_pixels,
            geometry=encoder.geometry,
            draft=self.draft,
        )
        cuda = encoder.device.type == "cuda"
        for unit in load_units(items, units, load, workers=workers, pin_memory=cuda):
            yield encode_unit(unit, encoder, forward_batch)

    def describe(self) -> dict[str, object]:
        workers, forward_batch = self._resolved or (self.workers, self.forward_batch)
        return {
            "engine": self.name,
            "workers": workers,
            "jpeg_draft": self.draft,
            "forward_batch": forward_batch,
        }


@register_engine("local")
def local_engine(
    *, workers: int | None = None, draft: bool = True, forward_batch: int | None = None
) -> LocalEngine:
    """Decode on this machine's CPUs (``workers`` processes; default by device), encode on its device."""
    return LocalEngine(workers, draft=draft, forward_batch=forward_batch)
