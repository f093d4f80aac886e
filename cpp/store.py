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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import numpy as np
from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config
from typing_extensions import NotRequired, TypedDict

from cpp.errors import CppError
from cpp.logging import get_logger

if TYPE_CHECKING:
    from cpp.sources import Item

_log = get_logger(__name__)

STORE_FORMAT: Final = "cpp-feature-store"
STORE_VERSION = 1
META_FILE = "meta.json"
RUN_FILE = "run.json"
CHUNK_DIR = "chunks"
#: Fields of an identity's ``source`` that only say where ground-truth labels and captions come from.
LABEL_FIELDS = ("labels_from_folders", "annotations")
_PART_FILE = re.compile(r"^(?:features|index)-(\d+)\.part-\d+\.(?:npy|jsonl)$")
_STRICT = ConfigDict(extra="forbid")


class StoreError(CppError):
    """A feature store is missing, incomplete, corrupt or belongs to another encoder/source."""


# The contract of the files: JSON documents as TypedDicts (read as plain dicts by reports and hashes),
# validated whenever a file is read; index lines as :class:`IndexEntry`.


@with_config(_STRICT)
class StoreIdentity(TypedDict):
    """What must match for a store to be reused or resumed."""

    encoder_id: str
    encoder_weights: Any  # the encoder's ``describe()["weights"]``: a name, a dict or None
    source: dict[str, Any]  # the resolved source spec


@with_config(_STRICT)
class StoreSettings(TypedDict):
    """How a store is laid out; kept from the run that started it when a run resumes."""

    chunk_size: int
    dtype: Literal["float16", "float32"]
    dim: int
    max_pixels: int


@with_config(_STRICT)
class ChunkRecord(TypedDict):
    """One complete chunk in ``meta.json``: its files, its source items and its embedded rows."""

    id: int
    features: str
    index: str
    items: int
    rows: int


@with_config(_STRICT)
class StoreCounts(TypedDict):
    items: int
    embedded: int
    skipped: int


@with_config(_STRICT)
class RunRecord(TypedDict):
    """``run.json``: the identity and settings of the run writing the store."""

    format: Literal["cpp-feature-store"]
    version: int
    identity: StoreIdentity
    settings: StoreSettings
    relabelling: NotRequired[bool]  # set while a partial store's labels are rewritten


@with_config(_STRICT)
class StoreDetails(TypedDict, total=False):
    """What the writer of a store records about how it was made (:meth:`StoreWriter.finish`).

    ``encoder_id`` and ``source`` are taken from the run's identity; given, they must equal it.
    """

    encoder_id: str
    encoder: dict[str, Any]  # the encoder's ``describe()``
    source: dict[str, Any]
    preprocessing: dict[str, Any]
    run: dict[str, Any]  # engine, batch size, threads, resumed items, ...
    timings_s: dict[str, Any]


@with_config(_STRICT)
class StoreMeta(TypedDict):
    """``meta.json``, written last: the identity, settings, chunks and counts of a complete store and how
    it was made (:class:`StoreDetails`)."""

    format: Literal["cpp-feature-store"]
    version: int
    complete: bool
    identity: StoreIdentity
    settings: StoreSettings
    dim: int
    dtype: Literal["float16", "float32"]
    chunk_size: int
    chunks: list[ChunkRecord]
    counts: StoreCounts
    created_at: str
    encoder_id: str
    encoder: dict[str, Any]
    source: dict[str, Any]
    preprocessing: NotRequired[dict[str, Any]]
    run: NotRequired[dict[str, Any]]
    timings_s: NotRequired[dict[str, Any]]
    relabelled: NotRequired[int]  # generation of the index files after label-only source changes


class EntryStatus(StrEnum):
    """Whether a source item was embedded (it has a row) or skipped (with a reason)."""

    ok = "ok"
    skipped = "skipped"


@with_config(_STRICT)
@dataclass(frozen=True)
class IndexEntry:
    """One source item, a line of an index file: embedded or skipped (with the reason).

    ``item`` is its position in the source; ``row`` its row in :meth:`FeatureStore.features`, assigned
    when its chunk is written (``None`` in parts and for skipped items).
    """

    key: str
    path: str | None
    captions: tuple[str, ...] = ()
    label: str | None = None
    status: EntryStatus = EntryStatus.ok
    reason: str | None = None
    item: int | None = None
    row: int | None = None

    def __post_init__(self) -> None:
        if (self.status is EntryStatus.ok) != (self.reason is None):
            raise ValueError("an entry has a reason exactly when it is skipped")
        if self.row is not None and self.status is not EntryStatus.ok:
            raise ValueError("a skipped entry has no row")

    @classmethod
    def of(cls, item: Item, number: int, reason: str | None = None) -> IndexEntry:
        """The entry of source item ``number``: embedded, or skipped when there is a ``reason``."""
        status = EntryStatus.ok if reason is None else EntryStatus.skipped
        return cls(item.key, item.path, tuple(item.captions), item.label, status, reason, number)

    @property
    def embedded(self) -> bool:
        return self.status is EntryStatus.ok

    def json_line(self) -> str:
        record = {
            "captions": list(self.captions),
            "item": self.item,
            "key": self.key,
            "label": self.label,
            "path": self.path,
            "reason": self.reason,
            "row": self.row,
            "status": self.status.value,
        }
        return json.dumps(record, sort_keys=True) + "\n"


_ENTRY = TypeAdapter(IndexEntry)
_RUN = TypeAdapter(RunRecord)
_META = TypeAdapter(StoreMeta)
_DETAILS = TypeAdapter(StoreDetails)
_IDENTITY = TypeAdapter(StoreIdentity)
_SETTINGS = TypeAdapter(StoreSettings)
_Doc = TypeVar("_Doc")


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


def chunk_record(number: int, items: int, rows: int, *, index: str | None = None) -> ChunkRecord:
    """The record of complete chunk ``number`` (``index``: its index file, when relabelled)."""
    return ChunkRecord(
        id=number, features=features_name(number), index=index or index_name(number), items=items, rows=rows
    )


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    _atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _index_bytes(entries: Sequence[IndexEntry]) -> bytes:
    return "".join(entry.json_line() for entry in entries).encode("utf-8")


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


def _parse_index(path: Path, lines: Iterator[str]) -> Iterator[IndexEntry]:
    for number, line in enumerate(lines, 1):
        try:
            yield _ENTRY.validate_json(line)
        except ValidationError as exc:
            raise StoreError(
                f"{path} line {number} is damaged ({_first_error(exc)}); delete the store and embed again"
            ) from None


def _read_index(path: Path) -> list[IndexEntry]:
    with open(path, encoding="utf-8") as handle:
        return list(_parse_index(path, handle))


def _entries(given: Sequence[IndexEntry | Mapping[str, Any]]) -> list[IndexEntry]:
    """``given`` as entries; mappings (the JSON form of an index line) are validated."""
    try:
        return [e if isinstance(e, IndexEntry) else _ENTRY.validate_python(e) for e in given]
    except ValidationError as exc:
        raise ValueError(f"bad index entry ({_first_error(exc)})") from None


def _npy_bytes(features: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, features, allow_pickle=False)
    return buffer.getvalue()


def _read_json(path: Path, adapter: TypeAdapter[_Doc], recover: str) -> _Doc:
    """The store file ``path``, validated; :class:`StoreError` saying what is wrong and ``recover``."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"cannot read {path} ({exc}); {recover}") from None
    if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
        raise StoreError(f"{path} is not a cpp feature store file; {recover}")
    if data.get("version") != STORE_VERSION:
        raise StoreError(
            f"{path} is of store version {data.get('version')!r}; this cpp reads version {STORE_VERSION}: "
            f"{recover}"
        )
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise StoreError(f"{path} is damaged ({_first_error(exc)}); {recover}") from None


def _check_meta(path: Path, meta: StoreMeta) -> None:
    """:class:`StoreError` unless the chunk list and the counts of ``meta.json`` at ``path`` agree."""
    chunks, counts = meta["chunks"], meta["counts"]
    problem = None
    if [chunk["id"] for chunk in chunks] != list(range(len(chunks))):
        problem = "chunk ids are not 0, 1, ..."
    elif any(chunk["features"] != features_name(chunk["id"]) for chunk in chunks):
        problem = "a chunk names another chunk's features"
    elif counts["items"] != sum(c["items"] for c in chunks) or counts["embedded"] != sum(
        c["rows"] for c in chunks
    ):
        problem = "the counts do not add up to the chunks'"
    elif counts["skipped"] != counts["items"] - counts["embedded"]:
        problem = "the skipped count does not match"
    elif (meta["dim"], meta["dtype"]) != (meta["settings"]["dim"], meta["settings"]["dtype"]):
        problem = "dim or dtype differ from the settings"
    if problem:
        raise StoreError(f"{path} is damaged ({problem}); delete the store directory and embed again")


def identity_mismatch(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
    """Describe how two store identities differ, or ``None`` when they match."""
    differences = [
        f"{field}: store has {existing.get(field)!r}, requested {wanted.get(field)!r}"
        for field in sorted(set(existing) | set(wanted))
        if existing.get(field) != wanted.get(field)
    ]
    return "; ".join(differences) or None


def differs_only_in_labels(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether two different identities agree but for the :data:`LABEL_FIELDS` of their source."""

    def images(identity: Mapping[str, Any]) -> dict[str, Any]:
        source = {k: v for k, v in dict(identity.get("source") or {}).items() if k not in LABEL_FIELDS}
        return {**identity, "source": source}

    return existing != wanted and images(existing) == images(wanted)


def _other_images(root: Path, difference: str) -> StoreError:
    return StoreError(
        f"{root} holds features of other images ({difference}); choose another output directory or delete "
        "this one"
    )


def _relabelled(root: Path, entries: list[IndexEntry], items: Sequence[Item], start: int) -> list[IndexEntry]:
    """Index ``entries`` of source items ``start, start + 1, ...`` with the captions and label of those
    ``items``; :class:`StoreError` unless the items have the same keys and paths."""
    listed = items[start : start + len(entries)]
    if len(listed) != len(entries):
        raise _other_images(root, f"the source lists {len(items)} items, the store more")
    out = []
    for entry, item in zip(entries, listed, strict=True):
        if (entry.key, entry.path) != (item.key, item.path):
            raise _other_images(root, f"the store has {entry.key!r} where the source lists {item.key!r}")
        out.append(replace(entry, captions=tuple(item.captions), label=item.label))
    return out


def _check_identity(path: Path, existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
    mismatch = identity_mismatch(existing, wanted)
    if mismatch:
        raise StoreError(
            f"{path} holds features of another encoder or source ({mismatch}); "
            "choose another output directory or delete this one"
        )


def _read_meta(root: Path) -> StoreMeta:
    path = root / META_FILE
    meta = _read_json(path, _META, f"delete {root} and embed again")
    _check_meta(path, meta)
    return meta


def _read_run(root: Path) -> RunRecord:
    return _read_json(root / RUN_FILE, _RUN, f"delete {root} and embed again")


class FeatureStore:
    """A complete feature store, opened read-only; chunk matrices are memory-mapped.

    ``meta`` is the validated ``meta.json`` (:class:`StoreMeta`).
    """

    def __init__(self, path: Path, meta: StoreMeta) -> None:
        self.path = path
        self.meta = meta
        self.dim = meta["dim"]
        self._chunks = list(meta["chunks"])

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        """Open a complete store; :class:`StoreError` (a ``CppError``) if it is missing, incomplete, damaged
        or of another store version."""
        root = Path(path)
        if not (root / META_FILE).is_file():
            state = "an unfinished embedding run" if (root / RUN_FILE).is_file() else "no feature store"
            raise StoreError(f"{root} holds {state}; run `cpp embed` to (finish) embedding into it")
        meta = _read_meta(root)
        if not meta["complete"]:
            raise StoreError(f"{root} is incomplete; run `cpp embed` again to finish it")
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
        return self.meta["encoder_id"]

    @property
    def encoder(self) -> dict[str, Any]:
        """The encoder's ``describe()`` recorded at embedding time."""
        return dict(self.meta["encoder"])

    @property
    def source(self) -> dict[str, Any]:
        return dict(self.meta["source"])

    @property
    def counts(self) -> StoreCounts:
        return self.meta["counts"].copy()

    def __len__(self) -> int:
        return self.meta["counts"]["embedded"]

    def _load_chunk(self, chunk: ChunkRecord) -> np.ndarray:
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

    def _iter_index(self) -> Iterator[IndexEntry]:
        for chunk in self._chunks:
            path = self.path / chunk["index"]
            with open(path, encoding="utf-8") as handle:
                yield from _parse_index(path, handle)

    def iter_rows(self) -> Iterator[RowRecord]:
        """The embedded items in row order, read from the index files as they are consumed."""
        for entry in self._iter_index():
            if entry.embedded:
                if entry.row is None:
                    raise StoreError(f"{self.path}: embedded item {entry.key!r} has no row; embed again")
                yield RowRecord(entry.row, entry.key, entry.path, entry.captions, entry.label)

    def rows(self) -> list[RowRecord]:
        """The embedded items, aligned with :meth:`features`."""
        return list(self.iter_rows())

    def skipped(self) -> list[SkippedRecord]:
        """The items that could not be embedded, with the reason."""
        return [
            SkippedRecord(entry.key, entry.path, entry.reason or "")
            for entry in self._iter_index()
            if not entry.embedded
        ]

    def relabel(self, identity: Mapping[str, Any], items: Sequence[Item]) -> FeatureStore:
        """The store with ``identity`` (its source set in ``meta.json`` too) and the captions and labels of
        ``items``, the source's items, which must have the stored keys and paths (else :class:`StoreError`).

        New index files are written beside the old ones, then ``meta.json`` is replaced to point at them, so
        an interruption leaves either store whole; the old index files are removed last.
        """
        checked = _IDENTITY.validate_python(identity)
        generation = self.meta.get("relabelled", 0) + 1
        chunks = []
        start = 0
        for chunk in self._chunks:
            entries = _read_index(self.path / chunk["index"])
            name = f"{CHUNK_DIR}/index-{chunk['id']:05d}.r{generation}.jsonl"
            _atomic_write(self.path / name, _index_bytes(_relabelled(self.path, entries, items, start)))
            chunks.append(chunk_record(chunk["id"], chunk["items"], chunk["rows"], index=name))
            start += len(entries)
        if start != len(items):
            raise _other_images(self.path, f"the source lists {len(items)} items, the store {start}")
        run_path = self.path / RUN_FILE
        if run_path.is_file():
            _write_json(run_path, {**_read_run(self.path), "identity": checked})
        meta = self.meta.copy()
        meta["identity"], meta["source"] = checked, checked["source"]
        meta["chunks"], meta["relabelled"] = chunks, generation
        _write_json(self.path / META_FILE, meta)
        for chunk in self._chunks:
            (self.path / chunk["index"]).unlink()
        _log.info("%s: labels and captions updated from the source, features reused", self.path)
        return FeatureStore.open(self.path)


class StoreWriter:
    """Writes a store chunk by chunk, saving parts of a chunk while it fills; reopening a partial store
    resumes after its last saved part. ``run`` is the store's ``run.json``."""

    def __init__(self, path: Path, run: Mapping[str, Any]) -> None:
        self.path = path
        try:
            self.run: RunRecord = _RUN.validate_python(run)
        except ValidationError as exc:
            raise StoreError(f"{path / RUN_FILE} is damaged ({_first_error(exc)}); delete {path}") from None
        settings = self.run["settings"]
        self.chunk_size = settings["chunk_size"]
        self.dtype = np.dtype(settings["dtype"])
        self.dim = settings["dim"]
        self.chunks = self._complete_chunks()
        self.rows_written = sum(chunk["rows"] for chunk in self.chunks)
        self._remove_complete_parts()
        self.parts = self._saved_parts()

    @classmethod
    def open(
        cls,
        path: str | Path,
        identity: Mapping[str, Any],
        settings: Mapping[str, Any],
        *,
        items: Sequence[Item] | None = None,
    ) -> StoreWriter:
        """Start a store in ``path`` or resume the partial one there.

        ``identity`` (:class:`StoreIdentity`: encoder and source) must match an existing run; its
        ``settings`` (:class:`StoreSettings`: chunk size, dtype, dim, ...) are kept so that a resumed store
        is the same as an uninterrupted one. With the source's ``items``, a run whose identity differs only
        in :data:`LABEL_FIELDS` is resumed too, after the labels and captions of what it saved are
        rewritten from ``items``.
        """
        root = Path(path)
        wanted = _IDENTITY.validate_python(identity)
        run_path = root / RUN_FILE
        if run_path.is_file():
            run = _read_run(root)
            if not differs_only_in_labels(run["identity"], wanted):
                _check_identity(root, run["identity"], wanted)
                if not run.get("relabelling"):
                    return cls(root, run)
            if items is None:
                raise StoreError(f"{root}: the labels of this partial store must be updated; run `cpp embed`")
            # Marked until every index file is rewritten, so that a rerun after an interruption, with
            # either source, rewrites them all again.
            run = run.copy()
            run["identity"], run["relabelling"] = wanted, True
            _write_json(run_path, run)
            writer = cls(root, run)
            writer._relabel(items)
            del writer.run["relabelling"]
            _write_json(run_path, writer.run)
            return writer
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise StoreError(
                f"{root} exists and is not an empty directory or a feature store; choose another --out"
            )
        checked = _SETTINGS.validate_python(settings)
        (root / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
        run = RunRecord(format=STORE_FORMAT, version=STORE_VERSION, identity=wanted, settings=checked)
        _write_json(run_path, run)
        return cls(root, run)

    def _complete_chunks(self) -> list[ChunkRecord]:
        chunks: list[ChunkRecord] = []
        while (self.path / index_name(len(chunks))).is_file():
            number = len(chunks)
            entries = _read_index(self.path / index_name(number))
            chunks.append(chunk_record(number, len(entries), sum(entry.embedded for entry in entries)))
        return chunks

    def _saved_parts(self) -> list[tuple[np.ndarray, list[IndexEntry]]]:
        """The saved parts of the chunk being written, in order: ``(features, entries)`` each."""
        chunk = len(self.chunks)
        parts: list[tuple[np.ndarray, list[IndexEntry]]] = []
        while (self.path / part_index_name(chunk, len(parts))).is_file():
            number = len(parts)
            entries = _read_index(self.path / part_index_name(chunk, number))
            name = part_features_name(chunk, number)
            features: np.ndarray | None
            try:
                features = np.load(self.path / name, allow_pickle=False)
            except (OSError, ValueError):
                features = None
            ok = sum(entry.embedded for entry in entries)
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

    def _block(self, what: str, features: np.ndarray, entries: list[IndexEntry]) -> np.ndarray:
        features = np.ascontiguousarray(features, dtype=self.dtype)
        ok = sum(entry.embedded for entry in entries)
        if features.shape != (ok, self.dim):
            raise ValueError(f"{what}: features {features.shape} do not match {ok} embedded items")
        return features

    def write_part(self, features: np.ndarray, entries: Sequence[IndexEntry | Mapping[str, Any]]) -> None:
        """Save the next items of the chunk being written before it is full (arguments as for
        :meth:`write_chunk`), so that a run stopped before the chunk is complete resumes after them."""
        chunk, number = len(self.chunks), len(self.parts)
        checked = _entries(entries)
        features = self._block(f"chunk {chunk} part {number}", features, checked)
        _atomic_write(self.path / part_features_name(chunk, number), _npy_bytes(features))
        _atomic_write(self.path / part_index_name(chunk, number), _index_bytes(checked))
        self.parts.append((features, checked))

    def write_chunk(self, features: np.ndarray, entries: Sequence[IndexEntry | Mapping[str, Any]]) -> None:
        """Write the next chunk: its saved parts, then ``features`` of its other embedded items and one
        :class:`IndexEntry` (or its JSON form) per other source item; the ``row`` of each embedded item is
        assigned here."""
        number = len(self.chunks)
        checked = _entries(entries)
        features = self._block(f"chunk {number}", features, checked)
        if self.parts:
            features = np.concatenate([part for part, _ in self.parts] + [features], axis=0)
            checked = [entry for _, saved in self.parts for entry in saved] + checked
        records = []
        row = self.rows_written
        for entry in checked:
            records.append(replace(entry, row=row if entry.embedded else None))
            row += entry.embedded
        _atomic_write(self.path / features_name(number), _npy_bytes(features))
        _atomic_write(self.path / index_name(number), _index_bytes(records))
        self.chunks.append(chunk_record(number, len(records), len(features)))
        self.rows_written = row
        self._remove_complete_parts()
        self.parts = []

    def finish(self, details: Mapping[str, Any] | None = None) -> FeatureStore:
        """Write ``meta.json``: the run's identity and settings, the chunk list and counts, and ``details``
        (:class:`StoreDetails`) of how the store was made; then open the store.

        Saved parts not yet in a chunk become the last chunk.
        """
        described = _DETAILS.validate_python(details or {})
        identity = self.run["identity"]
        for field in ("encoder_id", "source"):
            if field in described and described[field] != identity[field]:
                raise ValueError(f"{field} {described[field]!r} is not the store's")
        if self.parts:
            self.write_chunk(np.zeros((0, self.dim), dtype=self.dtype), [])
        items = self.items_done
        meta = StoreMeta(
            format=STORE_FORMAT,
            version=STORE_VERSION,
            complete=True,
            identity=identity,
            settings=self.run["settings"],
            dim=self.dim,
            dtype=self.run["settings"]["dtype"],
            chunk_size=self.chunk_size,
            chunks=self.chunks,
            counts=StoreCounts(items=items, embedded=self.rows_written, skipped=items - self.rows_written),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            encoder_id=identity["encoder_id"],
            encoder=described.get("encoder", {}),
            source=identity["source"],
        )
        for optional in ("preprocessing", "run", "timings_s"):
            if optional in described:
                meta[optional] = described[optional]
        _write_json(self.path / META_FILE, meta)
        return FeatureStore.open(self.path)


def check_complete_store(
    path: str | Path, identity: Mapping[str, Any], *, items: Callable[[], Sequence[Item]] | None = None
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
    existing = store.meta["identity"]
    if items is not None and differs_only_in_labels(existing, identity):
        return store.relabel(identity, items())
    _check_identity(root, existing, identity)
    return store
