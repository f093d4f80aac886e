"""Batched, resumable embedding of a source into a :class:`~cpp.store.FeatureStore`.

Decode and preprocessing run in DataLoader workers over an IterableDataset of *units* (up to ``batch_size``
consecutive source items that never cross a chunk boundary); unit ``u`` goes to worker ``u % workers`` and
the DataLoader returns units round-robin, i.e. in source order. Because units are aligned to chunks, a run
resumed after its last complete chunk forms exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cpp.encoders.base import Encoder
from cpp.images import DEFAULT_MAX_PIXELS, BadImage, decode_image
from cpp.logging import get_logger, progress_bar
from cpp.options import SourceSpec
from cpp.progress import RunControl
from cpp.sources import Item, iter_items, resolved_spec
from cpp.store import FeatureStore, StoreWriter, check_complete_store

_log = get_logger(__name__)

DTYPES = ("float16", "float32")


@dataclass
class _Unit:
    """A decoded unit: the tensors of its good items and the failures, by position in the unit."""

    start: int
    size: int
    batch: torch.Tensor | None
    failures: dict[int, str]


def _collate_unit(unit: _Unit) -> _Unit:
    return unit


class _UnitDataset(IterableDataset[_Unit]):
    """Yields decoded, preprocessed units in source order, sharded across DataLoader workers by unit."""

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

    def __iter__(self) -> Iterator[_Unit]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for number in range(worker, len(self.units), workers):
            start, end = self.units[number]
            yield self._load(start, end)

    def _load(self, start: int, end: int) -> _Unit:
        tensors: list[torch.Tensor] = []
        failures: dict[int, str] = {}
        for position, item in enumerate(self.items[start:end]):
            try:
                tensors.append(self._prepare(item))
            except BadImage as exc:
                failures[position] = exc.reason
        batch = torch.stack(tensors) if tensors else None
        return _Unit(start=start, size=end - start, batch=batch, failures=failures)

    def _prepare(self, item: Item) -> torch.Tensor:
        try:
            data = item.load_bytes()
        except OSError as exc:
            raise BadImage(f"unreadable ({type(exc).__name__}: {exc})") from None
        image = decode_image(data, max_pixels=self.max_pixels)
        try:
            return self.preprocess(image)
        except Exception as exc:  # a transform failing on one odd image must not stop the run
            raise BadImage(f"preprocessing failed ({type(exc).__name__}: {exc})") from None


def default_workers(device: torch.device) -> int:
    """Decode worker processes. On a 2-core CPU machine none: decoding inline between batches beat one
    worker competing with the inference threads (0.88 vs 0.82 of the bare forward, docs/benchmarks.md);
    more cores get up to 4 beside inference; CUDA gets as many as the cores allow (up to 8)."""
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return 0 if cores <= 2 else max(1, min(4, cores // 4))


def plan_units(start: int, total: int, chunk_size: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of at most ``batch_size`` items that never cross a ``chunk_size`` boundary."""
    units = []
    position = start
    while position < total:
        chunk_end = min(total, (position // chunk_size + 1) * chunk_size)
        end = min(chunk_end, position + batch_size)
        units.append((position, end))
        position = end
    return units


def store_identity(source: SourceSpec, encoder: Encoder) -> dict[str, Any]:
    """What must match for a store to be reused or resumed: the encoder (and its weights) and the source."""
    return {
        "encoder_id": encoder.id,
        "encoder_weights": encoder.describe().get("weights"),
        "source": resolved_spec(source),
    }


def embed_source(
    source: SourceSpec,
    out_dir: str | Path,
    encoder: Encoder,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    chunk_size: int = 4096,
    dtype: str = "float16",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    control: RunControl | None = None,
) -> FeatureStore:
    """Embed every image of ``source`` with ``encoder`` into a feature store at ``out_dir``.

    A complete store of the same encoder and source is returned at once; a partial one is resumed after
    its last complete chunk (with its original chunk size, dtype and max_pixels). Unusable files are
    skipped and listed with the reason. Raises :class:`~cpp.progress.Cancelled` between batches when
    ``control`` is cancelled; the chunks written so far are kept for resuming.
    """
    if batch_size < 1 or chunk_size < 1:
        raise ValueError("batch_size and chunk_size must be positive")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    started = time.perf_counter()
    identity = store_identity(source, encoder)
    existing = check_complete_store(out_dir, identity)
    if existing is not None:
        _log.info("using the existing feature store %s (%d rows)", existing.path, len(existing))
        return existing

    items = list(iter_items(source))
    listed = time.perf_counter()
    settings = {"chunk_size": chunk_size, "dtype": dtype, "dim": encoder.dim, "max_pixels": max_pixels}
    writer = StoreWriter.open(out_dir, identity, settings)
    if writer.run["settings"] != settings:
        _log.warning("resuming %s with its original settings %s", writer.path, writer.run["settings"])
    resumed = writer.items_done
    if resumed:
        _log.info("resuming %s after %d complete chunks (%d items)", writer.path, len(writer.chunks), resumed)
    workers = default_workers(encoder.device) if workers is None else workers
    units = plan_units(resumed, len(items), writer.chunk_size, batch_size)
    dataset = _UnitDataset(items, units, encoder.preprocess, int(writer.run["settings"]["max_pixels"]))
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        collate_fn=_collate_unit,  # type: ignore[arg-type]  # batch_size=None: one unit per call
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
    )
    control = control or RunControl()
    stage = control.stage("embed", total=len(items))
    encode_s = 0.0
    chunk_features: list[np.ndarray] = []
    chunk_entries: list[dict[str, Any]] = []
    with progress_bar(total=len(items), initial=resumed, unit="img", desc="embed", smoothing=0.1) as bar:
        if resumed:
            stage.advance(resumed)
        expected = resumed
        for unit in loader:
            if unit.start != expected:
                raise RuntimeError(f"embedding units out of order: got {unit.start}, expected {expected}")
            expected += unit.size
            if unit.batch is not None:
                tick = time.perf_counter()
                features = encoder.encode_images(unit.batch)
                encode_s += time.perf_counter() - tick
                chunk_features.append(features.numpy().astype(writer.dtype, copy=False))
            chunk_entries.extend(_entries(items, unit))
            if expected % writer.chunk_size == 0 or expected == len(items):
                writer.write_chunk(_stack(chunk_features, encoder.dim), chunk_entries)
                chunk_features, chunk_entries = [], []
            bar.update(unit.size)
            stage.advance(unit.size)
    finished = time.perf_counter()
    store = writer.finish(
        {
            "encoder_id": encoder.id,
            "encoder": encoder.describe(),
            "source": resolved_spec(source),
            "preprocessing": {
                "decode": "PIL; EXIF orientation applied; palette/alpha composited on white; CMYK, 16-bit "
                "and float converted to 8-bit RGB; first frame of animations",
                "max_pixels": writer.run["settings"]["max_pixels"],
                "encoder": encoder.describe().get("preprocess"),
            },
            "run": {
                "batch_size": batch_size,
                "workers": workers,
                "resumed_items": resumed,
                "torch_threads": torch.get_num_threads(),
            },
            "timings_s": {
                "list": round(listed - started, 3),
                "encode": round(encode_s, 3),
                "total": round(finished - started, 3),
                "images_per_s": round((len(items) - resumed) / max(finished - listed, 1e-9), 2),
            },
        }
    )
    counts = store.counts
    _log.info(
        "embedded %d of %d items into %s (%d skipped)",
        counts["embedded"],
        counts["items"],
        store.path,
        counts["skipped"],
    )
    return store


def _stack(parts: list[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, dim), dtype=np.float32)


def _entries(items: Sequence[Item], unit: _Unit) -> list[dict[str, Any]]:
    entries = []
    for position in range(unit.size):
        item = items[unit.start + position]
        reason = unit.failures.get(position)
        entries.append(
            {
                "item": unit.start + position,
                "key": item.key,
                "path": item.path,
                "captions": list(item.captions),
                "label": item.label,
                "status": "ok" if reason is None else "skipped",
                "reason": reason,
            }
        )
    return entries
