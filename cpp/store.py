"""The on-disk feature store: a chunked feature matrix, a per-item index and ``meta.json``.

Layout of a store directory::

    run.json                      identity and settings of the run that writes the store (written first)
    chunks/features-00000.npy     (rows, dim) float16/float32 features of chunk 0
    chunks/index-00000.jsonl      one line per source item of chunk 0: key, path, captions, label, status
    chunks/features-00001.part-00000.npy, chunks/index-00001.part-00000.jsonl
                                  a saved part of the chunk being written (partial stores only)
    meta.json                     written last: encoder, source, counts, timings; marks the store complete

Chunk ``c`` holds source items ``[c * chunk_size, (c + 1) * chunk_size)``. While a chunk fills, the items
embedded so far are saved as parts (consecutive items, :meth:`StoreWriter.write_part`); the complete chunk
replaces its parts, so a complete store holds chunks only. Every file is written to a temporary name and
renamed into place, the index file of a chunk or part last, so a chunk or part whose index file exists is
complete and an interrupted run resumes after the last saved part.

The identity (encoder and source) decides whether a store can be reused. When a requested source differs
from the stored one only in where ground truth and captions come from (:data:`LABEL_FIELDS`) and lists the
same items, the features are reused and the labels and captions of the index are rewritten from the source:
a complete store gets new index files (``chunks/index-00000.r1.jsonl``, ...) that ``meta.json`` switches to
in one atomic write.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cpp.errors import CppError
from cpp.logging import get_logger

if TYPE_CHECKING:
    from cpp.sources import Item

_log = get_logger(__name__)

STORE_FORMAT = "cpp-feature-store"
STORE_VERSION = 1
META_FILE = "meta.json"
RUN_FILE = "run.json"
CHUNK_DIR = "chunks"
#: Fields of an identity's ``source`` that only say where ground-truth labels and captions come from.
LABEL_FIELDS = ("labels_from_folders", "annotations")
_PART_FILE = re.compile(r"^(?:features|index)-(\d+)\.part-\d+\.(?:npy|jsonl)$")


class StoreError(CppError):
    """A feature store is missing, incomplete, corrupt or belongs to another encoder/source."""


@dataclass(frozen=True)
class RowRecord:
    """One embedded item; ``index`` is its row in :meth:`FeatureStore.features`."""

    index: int
    key: str
    path: str | None
    captions: tuple[str, ...]
    label: str | None


@dataclass(frozen=True)
class SkippedRecord:
    """A source item that was not embedded, and why."""

    key: str
    path: str | None
    reason: str


def features_name(chunk: int) -> str:
    return f"{CHUNK_DIR}/features-{chunk:05d}.npy"


def index_name(chunk: int) -> str:
    return f"{CHUNK_DIR}/index-{chunk:05d}.jsonl"


def part_features_name(chunk: int, part: int) -> str:
    return f"{CHUNK_DIR}/features-{chunk:05d}.part-{part:05d}.npy"


def part_index_name(chunk: int, part: int) -> str:
    return f"{CHUNK_DIR}/index-{chunk:05d}.part-{part:05d}.jsonl"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _index_bytes(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(record, sort_keys=True) + "\n" for record in records).encode("utf-8")


def _read_index(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _npy_bytes(features: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, features, allow_pickle=False)
    return buffer.getvalue()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"cannot read {path}: {exc}; delete the store directory and embed again") from exc
    if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
        raise StoreError(f"{path} is not a cpp feature store file")
    return data


def identity_mismatch(existing: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """Describe how two store identities differ, or ``None`` when they match."""
    differences = [
        f"{field}: store has {existing.get(field)!r}, requested {wanted.get(field)!r}"
        for field in sorted(set(existing) | set(wanted))
        if existing.get(field) != wanted.get(field)
    ]
    return "; ".join(differences) or None


def differs_only_in_labels(existing: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether two different identities agree but for the :data:`LABEL_FIELDS` of their source."""

    def images(identity: dict[str, Any]) -> dict[str, Any]:
        source = {k: v for k, v in dict(identity.get("source") or {}).items() if k not in LABEL_FIELDS}
        return {**identity, "source": source}

    return existing != wanted and images(existing) == images(wanted)


def _other_images(root: Path, difference: str) -> StoreError:
    return StoreError(
        f"{root} holds features of other images ({difference}); choose another output directory or delete "
        "this one"
    )


def _relabelled(
    root: Path, entries: list[dict[str, Any]], items: Sequence[Item], start: int
) -> list[dict[str, Any]]:
    """Index ``entries`` of source items ``start, start + 1, ...`` with the captions and label of those
    ``items``; :class:`StoreError` unless the items have the same keys and paths."""
    listed = items[start : start + len(entries)]
    if len(listed) != len(entries):
        raise _other_images(root, f"the source lists {len(items)} items, the store more")
    out = []
    for entry, item in zip(entries, listed, strict=True):
        if (entry["key"], entry["path"]) != (item.key, item.path):
            raise _other_images(root, f"the store has {entry['key']!r} where the source lists {item.key!r}")
        out.append({**entry, "captions": list(item.captions), "label": item.label})
    return out


def _check_identity(path: Path, existing: dict[str, Any], wanted: dict[str, Any]) -> None:
    mismatch = identity_mismatch(existing, wanted)
    if mismatch:
        raise StoreError(
            f"{path} holds features of another encoder or source ({mismatch}); "
            "choose another output directory or delete this one"
        )


class FeatureStore:
    """A complete feature store, opened read-only; chunk matrices are memory-mapped."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta
        self.dim = int(meta["dim"])
        self._chunks: list[dict[str, Any]] = list(meta["chunks"])

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        """Open a complete store; :class:`StoreError` (a ``CppError``) if it is missing or incomplete."""
        root = Path(path)
        meta_path = root / META_FILE
        if not meta_path.is_file():
            state = "an unfinished embedding run" if (root / RUN_FILE).is_file() else "no feature store"
            raise StoreError(f"{root} holds {state}; run `cpp embed` to (finish) embedding into it")
        meta = _read_json(meta_path)
        if not meta.get("complete"):
            raise StoreError(f"{root} is incomplete; run `cpp embed` again to finish it")
        if meta.get("version") != STORE_VERSION:
            raise StoreError(f"{root} has store version {meta.get('version')}, expected {STORE_VERSION}")
        store = cls(root, meta)
        for chunk in store._chunks:
            for name in (chunk["features"], chunk["index"]):
                if not (root / name).is_file():
                    raise StoreError(
                        f"{root}: chunk file {name} is missing; delete the store and embed again"
                    )
        return store

    @staticmethod
    def exists(path: str | Path) -> bool:
        """Whether ``path`` holds a complete store."""
        return (Path(path) / META_FILE).is_file()

    @property
    def encoder_id(self) -> str:
        return str(self.meta["encoder_id"])

    @property
    def encoder(self) -> dict[str, Any]:
        """The encoder's ``describe()`` recorded at embedding time."""
        return dict(self.meta["encoder"])

    @property
    def source(self) -> dict[str, Any]:
        return dict(self.meta["source"])

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.meta["counts"])

    def __len__(self) -> int:
        return int(self.meta["counts"]["embedded"])

    def _load_chunk(self, chunk: dict[str, Any]) -> np.ndarray:
        name = chunk["features"]
        try:
            array = np.load(self.path / name, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"{self.path}: chunk {name} is corrupt ({exc}); delete the store and embed again"
            ) from exc
        if array.shape != (chunk["rows"], self.dim):
            raise StoreError(
                f"{self.path}: chunk {name} has shape {array.shape}, expected {(chunk['rows'], self.dim)}; "
                "delete the store and embed again"
            )
        return array

    def iter_chunks(self) -> Iterator[np.ndarray]:
        """Per-chunk ``(rows_i, dim)`` memory-mapped arrays in row order."""
        for chunk in self._chunks:
            yield self._load_chunk(chunk)

    def iter_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, float32 block)`` per chunk, in row order; one chunk in memory at a time."""
        start = 0
        for chunk in self.iter_chunks():
            yield start, np.array(chunk, dtype=np.float32)  # a copy: the memory map is released
            start += len(chunk)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The float32 features of ``rows`` (any order), reading only the chunks (and pages) they touch."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row indices must be in 0..{len(self) - 1}")
        bounds = np.cumsum([0] + [int(chunk["rows"]) for chunk in self._chunks])
        which = np.searchsorted(bounds, rows, side="right") - 1
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for number in np.unique(which):
            selected = np.flatnonzero(which == number)
            local = rows[selected] - bounds[number]
            order = np.argsort(local, kind="stable")  # ascending reads of the memory map
            out[selected[order]] = self._load_chunk(self._chunks[number])[local[order]]
        return out

    def features(self, dtype: np.dtype[Any] | type = np.float32) -> np.ndarray:
        """All features as one ``(len(self), dim)`` array of ``dtype``."""
        parts = [np.asarray(chunk, dtype=dtype) for chunk in self.iter_chunks()]
        if not parts:
            return np.zeros((0, self.dim), dtype=dtype)
        return np.concatenate(parts, axis=0)

    def _iter_index(self) -> Iterator[dict[str, Any]]:
        for chunk in self._chunks:
            with open(self.path / chunk["index"], encoding="utf-8") as handle:
                for line in handle:
                    yield json.loads(line)

    def iter_rows(self) -> Iterator[RowRecord]:
        """The embedded items in row order, read from the index files as they are consumed."""
        for entry in self._iter_index():
            if entry["status"] == "ok":
                yield RowRecord(
                    index=entry["row"],
                    key=entry["key"],
                    path=entry["path"],
                    captions=tuple(entry["captions"]),
                    label=entry["label"],
                )

    def rows(self) -> list[RowRecord]:
        """The embedded items, aligned with :meth:`features`."""
        return list(self.iter_rows())

    def skipped(self) -> list[SkippedRecord]:
        """The items that could not be embedded, with the reason."""
        return [
            SkippedRecord(key=entry["key"], path=entry["path"], reason=entry["reason"])
            for entry in self._iter_index()
            if entry["status"] != "ok"
        ]

    def relabel(self, identity: dict[str, Any], items: Sequence[Item]) -> FeatureStore:
        """The store with ``identity`` (its source set in ``meta.json`` too) and the captions and labels of
        ``items``, the source's items, which must have the stored keys and paths (else :class:`StoreError`).

        New index files are written beside the old ones, then ``meta.json`` is replaced to point at them, so
        an interruption leaves either store whole; the old index files are removed last.
        """
        generation = int(self.meta.get("relabelled", 0)) + 1
        chunks = []
        start = 0
        for chunk in self._chunks:
            entries = _read_index(self.path / chunk["index"])
            name = f"{CHUNK_DIR}/index-{int(chunk['id']):05d}.r{generation}.jsonl"
            _atomic_write(self.path / name, _index_bytes(_relabelled(self.path, entries, items, start)))
            chunks.append({**chunk, "index": name})
            start += len(entries)
        if start != len(items):
            raise _other_images(self.path, f"the source lists {len(items)} items, the store {start}")
        run_path = self.path / RUN_FILE
        if run_path.is_file():
            _write_json(run_path, {**_read_json(run_path), "identity": identity})
        meta = {
            **self.meta,
            "identity": identity,
            "source": identity["source"],
            "chunks": chunks,
            "relabelled": generation,
        }
        _write_json(self.path / META_FILE, meta)
        for chunk in self._chunks:
            (self.path / chunk["index"]).unlink()
        _log.info("%s: labels and captions updated from the source, features reused", self.path)
        return FeatureStore.open(self.path)


class StoreWriter:
    """Writes a store chunk by chunk, saving parts of a chunk while it fills; reopening a partial store
    resumes after its last saved part."""

    def __init__(self, path: Path, run: dict[str, Any]) -> None:
        self.path = path
        self.run = run
        self.chunk_size = int(run["settings"]["chunk_size"])
        self.dtype = np.dtype(run["settings"]["dtype"])
        self.dim = int(run["settings"]["dim"])
        self.chunks = self._complete_chunks()
        self.rows_written = sum(chunk["rows"] for chunk in self.chunks)
        self._remove_complete_parts()
        self.parts = self._saved_parts()

    @classmethod
    def open(
        cls,
        path: str | Path,
        identity: dict[str, Any],
        settings: dict[str, Any],
        *,
        items: Sequence[Item] | None = None,
    ) -> StoreWriter:
        """Start a store in ``path`` or resume the partial one there.

        ``identity`` (encoder and source) must match an existing run; its ``settings`` (chunk size, dtype,
        dim, ...) are kept so that a resumed store is the same as an uninterrupted one. With the source's
        ``items``, a run whose identity differs only in :data:`LABEL_FIELDS` is resumed too, after the
        labels and captions of what it saved are rewritten from ``items``.
        """
        root = Path(path)
        run_path = root / RUN_FILE
        if run_path.is_file():
            run = _read_json(run_path)
            if not differs_only_in_labels(run["identity"], identity):
                _check_identity(root, run["identity"], identity)
                if not run.get("relabelling"):
                    return cls(root, run)
            if items is None:
                raise StoreError(f"{root}: the labels of this partial store must be updated; run `cpp embed`")
            # Marked until every index file is rewritten, so that a rerun after an interruption, with
            # either source, rewrites them all again.
            run = {**run, "identity": identity, "relabelling": True}
            _write_json(run_path, run)
            writer = cls(root, run)
            writer._relabel(items)
            writer.run = {key: value for key, value in run.items() if key != "relabelling"}
            _write_json(run_path, writer.run)
            return writer
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise StoreError(
                f"{root} exists and is not an empty directory or a feature store; choose another --out"
            )
        (root / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
        run = {"format": STORE_FORMAT, "version": STORE_VERSION, "identity": identity, "settings": settings}
        _write_json(run_path, run)
        return cls(root, run)

    def _complete_chunks(self) -> list[dict[str, Any]]:
        chunks: list[dict[str, Any]] = []
        while (self.path / index_name(len(chunks))).is_file():
            number = len(chunks)
            entries = _read_index(self.path / index_name(number))
            rows = sum(entry["status"] == "ok" for entry in entries)
            chunks.append(
                {
                    "id": number,
                    "features": features_name(number),
                    "index": index_name(number),
                    "items": len(entries),
                    "rows": rows,
                }
            )
        return chunks

    def _saved_parts(self) -> list[tuple[np.ndarray, list[dict[str, Any]]]]:
        """The saved parts of the chunk being written, in order: ``(features, entries)`` each."""
        chunk = len(self.chunks)
        parts: list[tuple[np.ndarray, list[dict[str, Any]]]] = []
        while (self.path / part_index_name(chunk, len(parts))).is_file():
            number = len(parts)
            entries = _read_index(self.path / part_index_name(chunk, number))
            name = part_features_name(chunk, number)
            features: np.ndarray | None
            try:
                features = np.load(self.path / name, allow_pickle=False)
            except (OSError, ValueError):
                features = None
            ok = sum(entry["status"] == "ok" for entry in entries)
            if features is None or features.shape != (ok, self.dim):
                raise StoreError(
                    f"{self.path}: part {name} is corrupt or missing; delete the part files of chunk {chunk} "
                    f"({CHUNK_DIR}/*-{chunk:05d}.part-*) and run again to embed their items again"
                )
            parts.append((features, entries))
        return parts

    def _remove_complete_parts(self) -> None:
        """Delete the part files of complete chunks (a run can stop between writing a chunk and this)."""
        for path in (self.path / CHUNK_DIR).iterdir():
            match = _PART_FILE.match(path.name)
            if match and int(match.group(1)) < len(self.chunks):
                path.unlink()

    def _relabel(self, items: Sequence[Item]) -> None:
        """Rewrite the labels and captions of every saved chunk and part from the source's ``items``."""
        start = 0
        for chunk in self.chunks:
            path = self.path / chunk["index"]
            entries = _relabelled(self.path, _read_index(path), items, start)
            _atomic_write(path, _index_bytes(entries))
            start += len(entries)
        for number, (features, saved) in enumerate(self.parts):
            entries = _relabelled(self.path, saved, items, start)
            _atomic_write(self.path / part_index_name(len(self.chunks), number), _index_bytes(entries))
            self.parts[number] = (features, entries)
            start += len(entries)
        _log.info("%s: labels and captions updated from the source, features reused", self.path)

    @property
    def items_done(self) -> int:
        """Source items covered by complete chunks and the saved parts of the next one."""
        return sum(chunk["items"] for chunk in self.chunks) + sum(len(entries) for _, entries in self.parts)

    def _block(self, what: str, features: np.ndarray, entries: list[dict[str, Any]]) -> np.ndarray:
        features = np.ascontiguousarray(features, dtype=self.dtype)
        ok = sum(entry["status"] == "ok" for entry in entries)
        if features.shape != (ok, self.dim):
            raise ValueError(f"{what}: features {features.shape} do not match {ok} embedded items")
        return features

    def write_part(self, features: np.ndarray, entries: list[dict[str, Any]]) -> None:
        """Save the next items of the chunk being written before it is full (arguments as for
        :meth:`write_chunk`), so that a run stopped before the chunk is complete resumes after them."""
        chunk, number = len(self.chunks), len(self.parts)
        features = self._block(f"chunk {chunk} part {number}", features, entries)
        _atomic_write(self.path / part_features_name(chunk, number), _npy_bytes(features))
        _atomic_write(self.path / part_index_name(chunk, number), _index_bytes(entries))
        self.parts.append((features, list(entries)))

    def write_chunk(self, features: np.ndarray, entries: list[dict[str, Any]]) -> None:
        """Write the next chunk: its saved parts, then ``features`` of its other embedded items and one
        index entry per other source item.

        Entries have ``key``, ``path``, ``captions``, ``label``, ``status`` (``ok`` or ``skipped``) and
        ``reason``; the ``row`` of each embedded item is assigned here.
        """
        number = len(self.chunks)
        features = self._block(f"chunk {number}", features, entries)
        if self.parts:
            features = np.concatenate([part for part, _ in self.parts] + [features], axis=0)
            entries = [entry for _, saved in self.parts for entry in saved] + entries
        records = []
        row = self.rows_written
        for entry in entries:
            records.append(dict(entry, row=row if entry["status"] == "ok" else None))
            row += entry["status"] == "ok"
        _atomic_write(self.path / features_name(number), _npy_bytes(features))
        _atomic_write(self.path / index_name(number), _index_bytes(records))
        self.chunks.append(
            {
                "id": number,
                "features": features_name(number),
                "index": index_name(number),
                "items": len(entries),
                "rows": len(features),
            }
        )
        self.rows_written = row
        self._remove_complete_parts()
        self.parts = []

    def finish(self, meta: dict[str, Any]) -> FeatureStore:
        """Write ``meta.json`` (run identity, settings, chunk list and counts added) and open the store.

        Saved parts not yet in a chunk become the last chunk.
        """
        if self.parts:
            self.write_chunk(np.zeros((0, self.dim), dtype=self.dtype), [])
        items = self.items_done
        full = dict(meta)
        full.update(
            format=STORE_FORMAT,
            version=STORE_VERSION,
            complete=True,
            identity=self.run["identity"],
            dim=self.dim,
            dtype=self.dtype.name,
            chunk_size=self.chunk_size,
            chunks=self.chunks,
            counts={"items": items, "embedded": self.rows_written, "skipped": items - self.rows_written},
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        full.setdefault("settings", self.run["settings"])
        _write_json(self.path / META_FILE, full)
        return FeatureStore.open(self.path)


def check_complete_store(
    path: str | Path, identity: dict[str, Any], *, items: Callable[[], Sequence[Item]] | None = None
) -> FeatureStore | None:
    """The complete store at ``path`` when its identity matches; ``None`` when there is none yet.

    With ``items`` (listing the source's items), a store whose identity differs only in
    :data:`LABEL_FIELDS` is reused: its labels and captions are rewritten from them
    (:meth:`FeatureStore.relabel`). :class:`StoreError` when a complete store there belongs to another
    encoder or source.
    """
    root = Path(path)
    if not FeatureStore.exists(root):
        return None
    store = FeatureStore.open(root)
    existing = store.meta.get("identity", {})
    if items is not None and differs_only_in_labels(existing, identity):
        return store.relabel(identity, items())
    _check_identity(root, existing, identity)
    return store
