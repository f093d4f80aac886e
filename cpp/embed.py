"""Batched, resumable embedding of a source into a :class:`~cpp.store.FeatureStore`.

The source is split into *units* (up to ``batch_size`` consecutive items that never cross a chunk boundary);
an engine (:mod:`cpp.engines`) decodes and encodes them and returns them in order, and each complete chunk is
written as it fills. In between, the units encoded since the last write are saved as a part of the chunk
every ``save_every_s`` seconds and when the run is cancelled, so a killed run loses at most those seconds and
the unit in flight, and a cancelled one nothing. Parts end at unit boundaries, so with the same batch size a
resumed run forms exactly the batches of an uninterrupted run, whichever engine runs it.

A store is reused when its encoder and source match; a source that differs only in where ground truth and
captions come from (``labels_from_folders``, COCO ``annotations``) reuses the features of the same images and
rewrites their labels and captions (:data:`cpp.store.LABEL_FIELDS`).
"""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path

import numpy as np
import torch

from cpp.encoders.base import Encoder
from cpp.engines import EmbedEngine, LocalEngine
from cpp.errors import OptionError
from cpp.images import DEFAULT_MAX_PIXELS
from cpp.logging import get_logger
from cpp.options import SourceSpec, StoreDtype
from cpp.progress import Cancelled, RunControl
from cpp.sources import Roots, SourceItems, resolved_spec
from cpp.store import (
    FeatureStore,
    IndexEntry,
    StoreDetails,
    StoreIdentity,
    StoreSettings,
    StoreWriter,
    check_complete_store,
)

_log = get_logger(__name__)

DTYPES = ("float16", "float32")
#: How images are decoded (:func:`cpp.images.decode_image`), as recorded in a store's ``meta.json``.
DECODE = (
    "PIL; EXIF orientation applied; palette/alpha composited on white; CMYK, 16-bit and float converted to "
    "8-bit RGB; first frame of animations"
)
#: Seconds between saves of the units encoded into a chunk that is not complete yet (a save of 64 rows of 512
#: float16 took 2.8 ms, fsync included, on a local disk: about 0.1 % of the time at this interval).
SAVE_EVERY_S = 2.0


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


def store_identity(source: SourceSpec, encoder: Encoder) -> StoreIdentity:
    """What must match for a store to be reused or resumed: the encoder (and its weights) and the source."""
    return StoreIdentity(
        encoder_id=encoder.id, encoder_weights=encoder.describe().get("weights"), source=resolved_spec(source)
    )


def embed_source(
    source: SourceSpec,
    out_dir: str | Path,
    encoder: Encoder,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    engine: EmbedEngine | None = None,
    chunk_size: int = 4096,
    dtype: StoreDtype = "float16",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    control: RunControl | None = None,
    roots: Roots = None,
    save_every_s: float = SAVE_EVERY_S,
) -> FeatureStore:
    """Embed every image of ``source`` with ``encoder`` into a feature store at ``out_dir``.

    A complete store of the same encoder and source is returned at once (its labels and captions updated
    when only those changed); a partial one is resumed after what it saved (with its original chunk size,
    dtype and max_pixels). Unusable files are skipped and listed with the reason. Raises
    :class:`~cpp.progress.Cancelled` between batches when ``control`` is cancelled, after saving every
    item encoded so far for resuming. Items of an unfinished chunk are saved every ``save_every_s`` seconds
    (0: after every batch). ``engine`` decodes and encodes (default: :class:`~cpp.engines.LocalEngine`
    with ``workers`` decode processes). With ``roots``, only files inside them are read
    (:mod:`cpp.sources`).
    """
    # Over 60 lines with its 13 arguments and their docstring; the body reads top to bottom in 44 lines.
    _check_arguments(batch_size, chunk_size, dtype, engine, workers)
    engine = engine or LocalEngine(workers)
    started = time.perf_counter()
    identity = store_identity(source, encoder)
    existing = check_complete_store(out_dir, identity, items=lambda: SourceItems.of(source, roots=roots))
    if existing is not None:
        _log.info("using the existing feature store %s (%d rows)", existing.path, len(existing))
        return existing

    items = SourceItems.of(source, roots=roots)
    listed = time.perf_counter()
    settings = StoreSettings(chunk_size=chunk_size, dtype=dtype, dim=encoder.dim, max_pixels=max_pixels)
    writer = _open_writer(out_dir, identity, settings, items)
    resumed = writer.items_done
    max_pixels_used = writer.run["settings"]["max_pixels"]
    encode_s = _write_units(
        writer,
        items,
        plan_units(resumed, len(items), writer.chunk_size, batch_size),
        resumed,
        encoder,
        engine,
        max_pixels_used,
        control or RunControl(),
        save_every_s,
    )
    finished = time.perf_counter()
    timings = {
        "list": round(listed - started, 3),
        "encode": round(encode_s, 3),
        "total": round(finished - started, 3),
        "images_per_s": round((len(items) - resumed) / max(finished - listed, 1e-9), 2),
    }
    details = _details(encoder, engine, batch_size, resumed, max_pixels_used, timings)
    store = writer.finish(details)
    counts = store.counts
    _log.info(
        "embedded %d of %d items into %s (%d skipped)",
        counts["embedded"],
        counts["items"],
        store.path,
        counts["skipped"],
    )
    return store


def _open_writer(
    out_dir: str | Path, identity: StoreIdentity, settings: StoreSettings, items: SourceItems
) -> StoreWriter:
    """The writer of the store at ``out_dir``: new, or resuming a partial one (with its own settings)."""
    writer = StoreWriter.open(out_dir, identity, settings, items=items)
    if writer.run["settings"] != settings:
        _log.warning("resuming %s with its original settings %s", writer.path, writer.run["settings"])
    if writer.items_done:
        _log.info(
            "resuming %s after %d items (%d complete chunks and %d parts)",
            writer.path,
            writer.items_done,
            len(writer.chunks),
            len(writer.parts),
        )
    return writer


def _details(
    encoder: Encoder,
    engine: EmbedEngine,
    batch_size: int,
    resumed: int,
    max_pixels: int,
    timings: dict[str, float],
) -> StoreDetails:
    """What ``meta.json`` records about how the store was made."""
    return StoreDetails(
        encoder=encoder.describe(),
        preprocessing={
            "decode": DECODE,
            "max_pixels": max_pixels,
            "encoder": encoder.describe().get("preprocess"),
        },
        run={
            "batch_size": batch_size,
            **engine.describe(),
            "resumed_items": resumed,
            "torch_threads": torch.get_num_threads(),
        },
        timings_s=timings,
    )


def _check_arguments(
    batch_size: int, chunk_size: int, dtype: str, engine: EmbedEngine | None, workers: int | None
) -> None:
    if batch_size < 1 or chunk_size < 1:
        name, value = ("batch_size", batch_size) if batch_size < 1 else ("chunk_size", chunk_size)
        raise OptionError(name, "must be >= 1", value=value)
    if engine is not None and workers is not None:
        raise OptionError(
            "workers", "give workers to the engine, not to embed_source, when passing an engine"
        )
    if dtype not in DTYPES:
        raise OptionError("dtype", f"must be one of {', '.join(DTYPES)}", value=dtype)


def _write_units(
    writer: StoreWriter,
    items: SourceItems,
    units: list[tuple[int, int]],
    resumed: int,
    encoder: Encoder,
    engine: EmbedEngine,
    max_pixels: int,
    control: RunControl,
    save_every_s: float,
) -> float:
    """Encode ``units`` of ``items`` (the first ``resumed`` are in the store) and write them to ``writer``:
    each chunk when it is complete, the units since the last write as a part every ``save_every_s`` seconds
    and on cancellation. Returns the seconds spent encoding."""
    encode_s = 0.0
    chunk_features: list[np.ndarray] = []
    chunk_entries: list[IndexEntry] = []
    with (
        closing(control.stage("embed", len(items), unit="img", initial=resumed)) as stage,
        closing(engine.run(items, units, encoder, max_pixels)) as encoded,  # stops the engine on errors
    ):
        expected = resumed
        saved_at = time.perf_counter()
        for unit in encoded:
            if unit.start != expected:
                raise RuntimeError(f"embedding units out of order: got {unit.start}, expected {expected}")
            expected += unit.size
            encode_s += unit.encode_s
            chunk_features.append(unit.features.astype(writer.dtype, copy=False))
            chunk_entries.extend(
                IndexEntry.of(item, unit.start + i, unit.failures.get(i))
                for i, item in enumerate(items[unit.start : unit.start + unit.size])
            )
            chunk_done = expected % writer.chunk_size == 0 or expected == len(items)
            if chunk_done or time.perf_counter() - saved_at >= save_every_s:
                write = writer.write_chunk if chunk_done else writer.write_part
                write(_stack(chunk_features, encoder.dim), chunk_entries)
                chunk_features, chunk_entries = [], []
                saved_at = time.perf_counter()
            try:
                stage.advance(unit.size)
            except Cancelled:
                if chunk_entries:
                    writer.write_part(_stack(chunk_features, encoder.dim), chunk_entries)
                raise
    return encode_s


def _stack(parts: list[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, dim), dtype=np.float32)
