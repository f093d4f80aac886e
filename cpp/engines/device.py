"""The device engine: JPEGs decoded in batches on the encoder's device, then resized and cropped there.

Readers (DataLoader worker processes, or inline) only read bytes and parse headers. A plain JPEG (RGB or
greyscale, complete, within ``max_pixels``) travels on as bytes with its EXIF orientation; any other file is
decoded on the CPU exactly as the local engine does (PIL, :func:`cpp.images.decode_image` and the encoder's
``preprocess``), or becomes a failure with the reason. A prefetch thread decodes each unit's JPEGs with
batched ``torchvision.io.decode_jpeg`` calls on the device (nvJPEG on CUDA, on a side stream), orients them,
and resizes and crops them with the encoder's :class:`~cpp.encoders.preprocessing.ImageGeometry`, while this
thread encodes the unit before. A batch the decoder rejects is retried image by image; an image it rejects
goes to the CPU path, so no item is lost, and units come out in order.
"""

from __future__ import annotations

import functools
import io
import math
import queue
import threading
import time
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

from cpp.encoders.base import Encoder
from cpp.encoders.preprocessing import ImageGeometry
from cpp.engines.base import DecodedUnit, EmbedEngine, EncodedUnit, load_units, prepare_image
from cpp.engines.local import LocalEngine, default_workers
from cpp.engines.registry import register_engine
from cpp.errors import CppError
from cpp.images import BadImage
from cpp.logging import get_logger
from cpp.sources import Item, read_failure

_log = get_logger(__name__)

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec and warns on every call.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io\.image")

_JPEG_MODES = ("RGB", "L")
_EOI_WINDOW = 32  # a complete JPEG has its end-of-image marker within this many bytes of the end
_EXIF_ORIENTATION = 0x0112
#: Pixels decoded on the device per call: a few hundred typical photos, about 1 GiB at peak with resizing.
DECODE_BATCH_PIXELS = 64_000_000


@dataclass(frozen=True)
class JpegHeader:
    """What the device path needs from a JPEG's header: its EXIF orientation (1-8) and pixel count."""

    orientation: int
    pixels: int


@dataclass
class _ReadUnit:
    """A unit after reading: JPEG bytes for the device, CPU-decoded other images, and the failures."""

    start: int
    size: int
    jpeg_positions: list[int]
    jpeg_headers: list[JpegHeader]
    jpeg_lengths: list[int]
    jpeg_data: torch.Tensor  # the unit's JPEG files, concatenated (uint8, 1-D)
    cpu_positions: list[int]
    cpu_batch: torch.Tensor | None  # uint8 NCHW, already preprocessed
    failures: dict[int, str]

    def pin_memory(self) -> _ReadUnit:
        """Called by the DataLoader's pinning step: page-lock the CPU-decoded batch for an async copy."""
        if self.cpu_batch is not None:
            self.cpu_batch = self.cpu_batch.pin_memory()
        return self


def jpeg_header(data: bytes, max_pixels: int) -> JpegHeader | None:
    """The header of a JPEG the device decoder can take as is, or ``None`` when the file should go the CPU
    way: not a JPEG, CMYK, no end-of-image marker (truncated), more than ``max_pixels``, odd header."""
    if not data.startswith(b"\xff\xd8") or b"\xff\xd9" not in data[-_EOI_WINDOW:]:
        return None
    try:
        image = Image.open(io.BytesIO(data))  # lazy: parses the header only
        width, height = image.size
        if image.format != "JPEG" or image.mode not in _JPEG_MODES or not 0 < width * height <= max_pixels:
            return None
    except Exception:  # PIL raises many types on malformed headers; the CPU path names the problem
        return None
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # malformed EXIF: decode_image keeps the pixels as stored, and so do we
        orientation = 1
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        orientation = 1
    return JpegHeader(orientation, width * height)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a CHW tensor as PIL's ``ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip([-2, -1])
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.rot90(-1, (-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip([-2, -1])
    if orientation == 8:
        return image.rot90(1, (-2, -1))
    return image


def read_unit(
    items: Sequence[Item],
    start: int,
    preprocess: Callable[[Image.Image], torch.Tensor],
    max_pixels: int,
    cpu_share: float = 0.0,
) -> _ReadUnit:
    """Read the unit ``items`` that starts at source index ``start``: JPEG bytes with their header, other
    files decoded on the CPU.

    ``cpu_share`` of the JPEGs (every item whose index crosses a multiple of ``1 / cpu_share``: the same
    items in a resumed run) are decoded on the CPU here too, to add the CPU's decode rate to the device's.
    """
    jpeg_positions: list[int] = []
    headers: list[JpegHeader] = []
    chunks: list[bytes] = []
    cpu_positions: list[int] = []
    cpu_images: list[torch.Tensor] = []
    failures: dict[int, str] = {}
    for position, item in enumerate(items):
        try:
            data = item.load_bytes()
        except OSError as exc:
            failures[position] = read_failure(exc)
            continue
        header = jpeg_header(data, max_pixels)
        index = start + position
        if header is not None and math.floor((index + 1) * cpu_share) == math.floor(index * cpu_share):
            jpeg_positions.append(position)
            headers.append(header)
            chunks.append(data)
            continue
        try:
            cpu_images.append(prepare_image(data, preprocess, max_pixels))
        except BadImage as exc:
            failures[position] = exc.reason
        else:
            cpu_positions.append(position)
    joined = bytearray().join(chunks)
    jpeg_data = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
    return _ReadUnit(
        start=start,
        size=len(items),
        jpeg_positions=jpeg_positions,
        jpeg_headers=headers,
        jpeg_lengths=[len(chunk) for chunk in chunks],
        jpeg_data=jpeg_data,
        cpu_positions=cpu_positions,
        cpu_batch=torch.stack(cpu_images) if cpu_images else None,
        failures=failures,
    )


def _pixel_batches(pixels: list[int], budget: int) -> Iterator[list[int]]:
    """Consecutive index batches whose pixels sum to at most ``budget`` (a larger image goes alone)."""
    batch: list[int] = []
    total = 0
    for index, count in enumerate(pixels):
        if batch and total + count > budget:
            yield batch
            batch, total = [], 0
        batch.append(index)
        total += count
    if batch:
        yield batch


@dataclass
class DeviceDecoder:
    """Turns read units into decoded units on ``device``: batched JPEG decode, orientation, resize, crop.

    JPEGs are decoded in batches of at most ``max_batch_pixels`` pixels (by their headers), so that a unit
    of large photos does not hold all of them at full size on the device at once.
    """

    device: torch.device
    geometry: ImageGeometry
    preprocess: Callable[[Image.Image], torch.Tensor]
    max_pixels: int
    max_batch_pixels: int = DECODE_BATCH_PIXELS
    #: Images decoded on the device, and by PIL (other formats and files the device decoder rejected).
    counts: dict[str, int] = field(default_factory=lambda: {"device_decoded": 0, "cpu_decoded": 0})

    def __call__(self, unit: _ReadUnit) -> DecodedUnit:
        images: dict[int, torch.Tensor] = {}
        failures = dict(unit.failures)
        encoded = list(unit.jpeg_data.split(unit.jpeg_lengths)) if unit.jpeg_positions else []
        for chunk in _pixel_batches([header.pixels for header in unit.jpeg_headers], self.max_batch_pixels):
            good: list[tuple[int, torch.Tensor]] = []
            for index, image in zip(chunk, self.decode([encoded[index] for index in chunk]), strict=True):
                position = unit.jpeg_positions[index]
                if image is not None:
                    good.append((position, orient(image, unit.jpeg_headers[index].orientation)))
                    continue
                try:
                    prepared = prepare_image(
                        encoded[index].numpy().tobytes(), self.preprocess, self.max_pixels
                    )
                except BadImage as exc:
                    failures[position] = exc.reason
                else:
                    images[position] = prepared.to(self.device)
                    self.counts["cpu_decoded"] += 1
            resized = self.resize_crop([image for _, image in good])
            images.update((position, image) for (position, _), image in zip(good, resized, strict=True))
            self.counts["device_decoded"] += len(good)
        if unit.cpu_batch is not None:
            cpu_batch = unit.cpu_batch.to(self.device, non_blocking=unit.cpu_batch.is_pinned())
            images.update(zip(unit.cpu_positions, cpu_batch.unbind(0), strict=True))
            self.counts["cpu_decoded"] += len(unit.cpu_positions)
        batch = torch.stack([images[position] for position in sorted(images)]) if images else None
        return DecodedUnit(start=unit.start, size=unit.size, batch=batch, failures=failures)

    def decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Decode JPEG byte tensors to RGB CHW uint8 on the device; ``None`` where the decoder fails.

        One batched call; when it fails (it returns nothing then), each image is retried alone.
        """
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
        except (RuntimeError, ValueError) as exc:
            if len(encoded) > 1:
                _log.debug("batched JPEG decode failed (%s); retrying image by image", exc)
        return [self._decode_one(data) for data in encoded]

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg([data], mode=ImageReadMode.RGB, device=self.device)[0]
        except (RuntimeError, ValueError) as exc:
            _log.debug("device JPEG decode rejected an image (%s); decoding it with PIL", exc)
            return None

    def resize_crop(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Apply the geometry to CHW images, one batched call per distinct input size."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            by_shape.setdefault(tuple(image.shape), []).append(index)
        out: dict[int, torch.Tensor] = {}
        for indices in by_shape.values():
            batch = self.geometry(torch.stack([images[index] for index in indices]))
            out.update(zip(indices, batch.unbind(0), strict=True))
        return [out[index] for index in range(len(images))]


class FittingEncode:
    """``encoder.encode_images`` that splits a batch into halves (and remembers the size) on device OOM."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.limit: int | None = None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        start = 0
        while start < len(batch):
            size = min(self.limit or len(batch), len(batch) - start)
            out_of_memory = False
            try:
                parts.append(self.encoder.encode_images(batch[start : start + size]))
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                out_of_memory = True
            if not out_of_memory:
                start += size
                continue
            self.limit = size // 2  # outside the handler, so the failed forward's memory can be freed
            _log.warning("out of device memory at %d images per forward; using %d", size, self.limit)
            if self.encoder.device.type == "cuda":
                torch.cuda.empty_cache()
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class _Failed:
    error: BaseException


#: What the prefetch thread hands over: a decoded unit with the event that marks it ready on the device
#: (CUDA), the error that stopped it, or ``None`` at the end.
_Entry = tuple[DecodedUnit, torch.cuda.Event | None] | _Failed | None


class DeviceDecodeEngine(EmbedEngine):
    """Read in ``workers`` processes (``None``: :func:`default_workers`; 0: inline), decode JPEGs on the
    encoder's device in a prefetch thread (``prefetch`` units ahead), encode here. ``cpu_share`` of the
    JPEGs are decoded by the readers with PIL instead, for when the device decoder is the bottleneck and
    the readers have cores to spare."""

    name = "device"

    def __init__(self, workers: int | None = None, prefetch: int = 2, cpu_share: float = 0.0) -> None:
        if workers is not None and workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if not 0.0 <= cpu_share <= 1.0:
            raise ValueError(f"cpu_share must be between 0 and 1, got {cpu_share}")
        self.workers = workers
        self.prefetch = prefetch
        self.cpu_share = cpu_share
        self._resolved: int | None = None
        self._decoder: DeviceDecoder | None = None

    def decoder(self, encoder: Encoder, max_pixels: int) -> DeviceDecoder:
        """The device decoder for ``encoder``; :class:`CppError` when its preprocessing has no tensor form."""
        if encoder.geometry is None:
            raise CppError(
                f"encoder {encoder.id} has no tensor geometry for the device engine; use --engine local"
            )
        return DeviceDecoder(encoder.device, encoder.geometry, encoder.preprocess, max_pixels)

    def run(
        self, items: Sequence[Item], units: list[tuple[int, int]], encoder: Encoder, max_pixels: int
    ) -> Generator[EncodedUnit, None, None]:
        decoder = self._decoder = self.decoder(encoder, max_pixels)
        workers = default_workers(encoder.device) if self.workers is None else self.workers
        self._resolved = workers
        cuda = encoder.device.type == "cuda"
        load = functools.partial(
            read_unit, preprocess=encoder.preprocess, max_pixels=max_pixels, cpu_share=self.cpu_share
        )
        loader = load_units(items, units, load, workers=workers, pin_memory=cuda)
        ready: queue.Queue[_Entry] = queue.Queue(self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(
            target=_produce, args=(loader, decoder, ready, stop), name="cpp-device-decode", daemon=True
        )
        thread.start()
        encode = FittingEncode(encoder)
        try:
            while (entry := ready.get()) is not None:
                if isinstance(entry, _Failed):
                    raise entry.error
                unit, event = entry
                if event is not None:
                    stream = torch.cuda.current_stream(encoder.device)
                    stream.wait_event(event)
                    if unit.batch is not None:
                        unit.batch.record_stream(stream)
                started = time.perf_counter()
                features = (
                    np.zeros((0, encoder.dim), dtype=np.float32)
                    if unit.batch is None
                    else encode(unit.batch).numpy()
                )
                yield EncodedUnit(
                    unit.start, unit.size, features, unit.failures, encode_s=time.perf_counter() - started
                )
        finally:
            stop.set()
            thread.join()

    def describe(self) -> dict[str, object]:
        described: dict[str, object] = {
            "engine": self.name,
            "workers": self.workers if self._resolved is None else self._resolved,
            "cpu_share": self.cpu_share,
        }
        if self._decoder is not None:
            described.update(self._decoder.counts)
        return described


def _produce(
    loader: DataLoader[_ReadUnit],
    decoder: DeviceDecoder,
    ready: queue.Queue[_Entry],
    stop: threading.Event,
) -> None:
    """The prefetch thread: read units, decode them on a side stream, hand them over with a ready event."""
    stream = torch.cuda.Stream(decoder.device) if decoder.device.type == "cuda" else None
    entry: _Entry
    try:
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for read in loader:
                unit = decoder(read)
                event = None
                if stream is not None:
                    event = torch.cuda.Event()
                    event.record(stream)
                if not _put(ready, (unit, event), stop):
                    return
        entry = None
    except BaseException as exc:  # handed to the consuming thread, which raises it
        entry = _Failed(exc)
    _put(ready, entry, stop)


def _put(ready: queue.Queue[_Entry], entry: _Entry, stop: threading.Event) -> bool:
    """Put ``entry`` unless the consumer has stopped; whether it was put."""
    while not stop.is_set():
        try:
            ready.put(entry, timeout=0.1)
        except queue.Full:
            continue
        return True
    return False


class AutoEngine(EmbedEngine):
    """The device engine when the encoder runs on CUDA and its preprocessing has a tensor form, else the
    local engine (decoding with PIL in CPU workers is as fast as anything on a CPU-only machine)."""

    name = "auto"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers
        self._chosen: EmbedEngine | None = None

    def run(
        self, items: Sequence[Item], units: list[tuple[int, int]], encoder: Encoder, max_pixels: int
    ) -> Generator[EncodedUnit, None, None]:
        on_device = encoder.device.type == "cuda" and encoder.geometry is not None
        self._chosen = DeviceDecodeEngine(self.workers) if on_device else LocalEngine(self.workers)
        yield from self._chosen.run(items, units, encoder, max_pixels)

    def describe(self) -> dict[str, object]:
        if self._chosen is None:
            return {"engine": self.name}
        return {**self._chosen.describe(), "chosen_by": self.name}


@register_engine("device")
def device_engine(
    *, workers: int | None = None, prefetch: int = 2, cpu_share: float = 0.0
) -> DeviceDecodeEngine:
    """Decode JPEGs in batches on the encoder's device (nvJPEG on CUDA); other formats with PIL on the CPU."""
    return DeviceDecodeEngine(workers, prefetch, cpu_share)


@register_engine("auto")
def auto_engine(*, workers: int | None = None) -> AutoEngine:
    """``device`` when the encoder runs on CUDA, else ``local``."""
    return AutoEngine(workers)
