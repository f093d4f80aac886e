"""What an embedding engine does: turn planned units of source items into encoded feature blocks.

A *unit* is a ``[start, end)`` range of consecutive source items (at most one batch, never crossing a store
chunk). Engines decode and encode units wherever they run (DataLoader workers here, Ray actors across
machines) and yield :class:`EncodedUnit` blocks in unit order; :func:`cpp.embed.embed_source` writes them.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from cpp.encoders.base import Encoder
from cpp.images import BadImage, decode_image
from cpp.sources import Item, read_failure

T = TypeVar("T")


@dataclass
class DecodedUnit:
    """A unit after decoding: the uint8 batch of its good items and the failures, by position in the unit."""

    start: int
    size: int
    batch: torch.Tensor | None
    failures: dict[int, str]


@dataclass
class EncodedUnit:
    """A unit after encoding: float32 features of its good items (in item order) and the failures."""

    start: int
    size: int
    features: np.ndarray  # (size - len(failures), dim) float32
    failures: dict[int, str]
    encode_s: float = 0.0  # seconds spent in the encoder's forward pass


def decode_unit(
    items: Sequence[Item],
    start: int,
    preprocess: Callable[[Image.Image], torch.Tensor],
    max_pixels: int,
) -> DecodedUnit:
    """Read, decode and preprocess the unit ``items`` that starts at source index ``start``; unusable items
    become failures with the reason."""
    tensors: list[torch.Tensor] = []
    failures: dict[int, str] = {}
    for position, item in enumerate(items):
        try:
            tensors.append(_prepare(item, preprocess, max_pixels))
        except BadImage as exc:
            failures[position] = exc.reason
    batch = torch.stack(tensors) if tensors else None
    return DecodedUnit(start=start, size=len(items), batch=batch, failures=failures)


def _prepare(item: Item, preprocess: Callable[[Image.Image], torch.Tensor], max_pixels: int) -> torch.Tensor:
    try:
        data = item.load_bytes()
    except OSError as exc:
        raise BadImage(read_failure(exc)) from None
    return prepare_image(data, preprocess, max_pixels)


def prepare_image(
    data: bytes, preprocess: Callable[[Image.Image], torch.Tensor], max_pixels: int
) -> torch.Tensor:
    """The CPU path for one file's bytes: PIL decode and ``preprocess``, or :class:`BadImage`."""
    image = decode_image(data, max_pixels=max_pixels)
    try:
        return preprocess(image)
    except Exception as exc:  # a transform failing on one odd image must not stop the run
        raise BadImage(f"preprocessing failed ({type(exc).__name__}: {exc})") from None


def encode_unit(unit: DecodedUnit, encoder: Encoder) -> EncodedUnit:
    """Run the encoder on a decoded unit (an empty feature block when every item failed)."""
    started = time.perf_counter()
    if unit.batch is None:
        features = np.zeros((0, encoder.dim), dtype=np.float32)
    else:
        features = encoder.encode_images(unit.batch).numpy()
    return EncodedUnit(unit.start, unit.size, features, unit.failures, encode_s=time.perf_counter() - started)


class _UnitItems(NamedTuple):
    """What a loader worker gets for one unit: its first source index and its items."""

    start: int
    items: list[Item]


class _UnitSampler(Sampler[_UnitItems]):
    """Slices each unit's items from the source in the loader's own process, as the loader asks for them, and
    hands them to the worker, so workers never list the source themselves."""

    def __init__(self, items: Sequence[Item], units: list[tuple[int, int]]) -> None:
        self.items = items
        self.units = units

    def __iter__(self) -> Iterator[_UnitItems]:
        for start, end in self.units:
            yield _UnitItems(start, list(self.items[start:end]))

    def __len__(self) -> int:
        return len(self.units)


class _UnitDataset(Dataset[T], Generic[T]):
    """``load(items, start)`` of the unit the sampler hands over."""

    def __init__(self, load: Callable[[list[Item], int], T]) -> None:
        self.load = load

    def __getitem__(self, unit: _UnitItems) -> T:
        return self.load(unit.items, unit.start)


def _one_unit(unit: T) -> T:
    return unit


def load_units(
    items: Sequence[Item],
    units: list[tuple[int, int]],
    load: Callable[[list[Item], int], T],
    *,
    workers: int,
    pin_memory: bool,
) -> DataLoader[T]:
    """Iterate ``load(items[start:end], start)`` over ``units`` in order, run in ``workers`` processes
    (0: inline). ``load`` must be picklable (e.g. a ``functools.partial`` of a module-level function)."""
    return DataLoader(
        _UnitDataset(load),
        batch_size=None,
        sampler=_UnitSampler(items, units),
        num_workers=workers,
        collate_fn=_one_unit,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
    )


class EmbedEngine(ABC):
    """Produces encoded units, in order, for :func:`cpp.embed.embed_source`."""

    #: Name recorded in the store's run metadata.
    name: str

    @abstractmethod
    def run(
        self, items: Sequence[Item], units: list[tuple[int, int]], encoder: Encoder, max_pixels: int
    ) -> Generator[EncodedUnit, None, None]:
        """Yield one :class:`EncodedUnit` per unit of ``units``, in that order."""

    def describe(self) -> dict[str, object]:
        """JSON-ready settings recorded in the store (engine name, workers, ...)."""
        return {"engine": self.name}
