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
from cpp.encoders.preprocessing import ImageGeometry
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
    decode_s: float = 0.0  # seconds spent reading, decoding and preprocessing


@dataclass
class EncodedUnit:
    """A unit after encoding: float32 features of its good items (in item order) and the failures."""

    start: int
    size: int
    features: np.ndarray  # (size - len(failures), dim) float32
    failures: dict[int, str]
    encode_s: float = 0.0  # seconds spent in the encoder's forward pass
    decode_s: float = 0.0  # seconds spent reading, decoding and preprocessing (wherever that ran)


def decode_unit(
    items: Sequence[Item],
    start: int,
    preprocess: Callable[[Image.Image], torch.Tensor],
    max_pixels: int,
    geometry: ImageGeometry | None = None,
    draft: bool = False,
) -> DecodedUnit:
    """Read, decode and preprocess the unit ``items`` that starts at source index ``start``; unusable items
    become failures with the reason. ``geometry`` and ``draft``: see :func:`prepare_image`."""
    started = time.perf_counter()
    tensors: list[torch.Tensor] = []
    failures: dict[int, str] = {}
    for position, item in enumerate(items):
        try:
            tensors.append(_prepare(item, preprocess, max_pixels, geometry, draft))
        except BadImage as exc:
            failures[position] = exc.reason
    batch = torch.stack(tensors) if tensors else None
    return DecodedUnit(
        start=start,
        size=len(items),
        batch=batch,
        failures=failures,
        decode_s=time.perf_counter() - started,
    )


def _prepare(
    item: Item,
    preprocess: Callable[[Image.Image], torch.Tensor],
    max_pixels: int,
    geometry: ImageGeometry | None,
    draft: bool,
) -> torch.Tensor:
    try:
        data = item.load_bytes()
    except OSError as exc:
        raise BadImage(read_failure(exc)) from None
    return prepare_image(data, preprocess, max_pixels, geometry, draft=draft)


def prepare_image(
    data: bytes,
    preprocess: Callable[[Image.Image], torch.Tensor],
    max_pixels: int,
    geometry: ImageGeometry | None = None,
    *,
    draft: bool = False,
) -> torch.Tensor:
    """The CPU path for one file's bytes: PIL decode and ``preprocess``, or :class:`BadImage`.

    ``geometry`` (the encoder's :attr:`~cpp.encoders.base.Encoder.geometry`, what ``preprocess`` does) makes
    it faster: a resize followed by a centre crop resamples only the cropped window (the same pixels up to
    rounding, :func:`resize_crop`); with ``draft`` too, JPEGs are decoded at the largest 1/2, 1/4 or 1/8 scale
    that keeps them at least :data:`DRAFT_MARGIN` times the resize target (:func:`cpp.images.decode_image`),
    which changes the features slightly (measured against the full decode: docs/benchmarks.md).
    """
    min_size = None
    if geometry is not None and draft:
        width, height = geometry.min_source_size
        min_size = (width * DRAFT_MARGIN, height * DRAFT_MARGIN)
    image = decode_image(data, max_pixels=max_pixels, min_size=min_size)
    try:
        cropped = None if geometry is None else resize_crop(image, geometry)
        return preprocess(image) if cropped is None else cropped
    except Exception as exc:  # a transform failing on one odd image must not stop the run
        raise BadImage(f"preprocessing failed ({type(exc).__name__}: {exc})") from None


#: How much larger than the resize target a JPEG decoded at reduced scale stays. Decoding right down to the
#: target (1) gave feature cosines against the full decode as low as 0.955 (mean 0.992), the DCT-scaled image
#: being softer than a bicubic reduction; at 2 the lowest was 0.9935 and the mean at least 0.999
#: (offline encoder; docs/benchmarks.md).
DRAFT_MARGIN = 2

_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


def resize_crop(image: Image.Image, geometry: ImageGeometry) -> torch.Tensor | None:
    """``geometry`` on an RGB PIL image as a uint8 CHW tensor, resampling only the centre-crop window, or
    ``None`` where that does not apply (no crop, a crop larger than the resized image, no resize needed).

    The window is resampled in two one-direction passes (PIL's ``box``), horizontal then vertical, with the
    coefficients of the full resize, so the pixels are those of torchvision's ``Resize`` + ``CenterCrop``
    up to rounding: PIL picks the order of its own passes, and where it takes the other one (some tall
    images) values differ by a few levels (mean under 0.2 of 255 over 180 random sizes; otherwise at most 1).
    """
    resample = _PIL_FILTERS.get(geometry.interpolation)
    if geometry.crop is None or resample is None:
        return None
    width, height = image.size
    new_width, new_height = geometry.resized_size(width, height)
    crop_height, crop_width = geometry.crop
    if crop_width > new_width or crop_height > new_height or (new_width, new_height) == (width, height):
        return None
    left = round((new_width - crop_width) / 2.0)  # torchvision's centre crop
    top = round((new_height - crop_height) / 2.0)
    scale_x, scale_y = width / new_width, height / new_height
    rows = image.resize(
        (crop_width, height), resample, box=(left * scale_x, 0, (left + crop_width) * scale_x, height)
    )
    window = rows.resize(
        (crop_width, crop_height), resample, box=(0, top * scale_y, crop_width, (top + crop_height) * scale_y)
    )
    return torch.from_numpy(np.array(window)).permute(2, 0, 1)


def encode_unit(unit: DecodedUnit, encoder: Encoder, forward_batch: int | None = None) -> EncodedUnit:
    """Run the encoder on a decoded unit (an empty feature block when every item failed), ``forward_batch``
    images per forward pass (``None``: the whole unit at once)."""
    if forward_batch is not None and forward_batch < 1:
        raise ValueError(f"forward_batch must be >= 1, got {forward_batch}")
    started = time.perf_counter()
    if unit.batch is None:
        features = np.zeros((0, encoder.dim), dtype=np.float32)
    elif forward_batch is None or len(unit.batch) <= forward_batch:
        features = encoder.encode_images(unit.batch).numpy()
    else:
        parts = [encoder.encode_images(part).numpy() for part in unit.batch.split(forward_batch)]
        features = np.concatenate(parts, axis=0)
    return EncodedUnit(
        unit.start,
        unit.size,
        features,
        unit.failures,
        encode_s=time.perf_counter() - started,
        decode_s=unit.decode_s,
    )


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
