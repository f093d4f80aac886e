"""The clustering artifact: a finished run, reopened to assign new images, browse, edit and export it.

A clustering is the work directory of a run (``cpp cluster``'s ``--work-dir``, or a service job's folder)::

    clustering.json          Manifest: schema version, id, the encoder (spec and description, which includes
                             its preprocessing), the options, the source, the space the readout lives in
                             ("head" or "raw"), the novelty calibration, and the file names below
    features/                the feature store it was fitted on (cpp.store): member rows 0..F-1
                             (with ``cpp fit``: a symbolic link to the store it was given, not a copy)
    head/                    the fitted head (absent when the collection was clustered without one)
    readout.npz              the readout of revision 0: per cluster ``centers`` (K, d) and subspace ``bases``
                             (K, d, r); per member ``labels``, ``confidence`` (score margin) and ``fit``
                             (energy in its own cluster's subspace), in store row order
    novelty.npz              the novelty model (:class:`NoveltyModel`): a Gaussian per revision-0 cluster of
                             the encoder features, and the scores of members it was not fitted on, which
                             calibrate it; made on first use (:meth:`Clustering.novelty_model`)
    revisions/<n>.json       revision n: its clusters (names, sizes, representatives) and the edit making it
    revisions/<n>.labels.npy revision n's cluster of every member (store row order; -1 = marked outlier)
    result.json              the result of the newest revision (``revision`` and ``edits`` included)
    assignments.jsonl        per-image assignments of the newest revision, when there are too many to inline
    additions/<n>/features/  the feature store of the n-th batch of images added without refitting
                             (``cpp assign --update``, :meth:`Clustering.grow`); of its rows, those listed
                             in ``members.npz`` are members
    additions/<n>/members.npz  per added member: ``store_rows`` (its row in that store), ``confidence``
                             (score margin when assigned) and ``novel`` (it fitted no cluster)

Revisions are append-only: an edit writes revision n + 1 (labels first, then its JSON, which commits it)
and rewrites the result; restoring revision m writes a new revision with m's state. The newest revision is
the highest-numbered JSON file. Readers never see a half-written revision: files appear by atomic rename.

Members are addressed by row: the fitted store's rows first, then each addition's members in order (the
manifest's ``additions`` says where each batch starts; ``members`` counts them all). The member set only
grows: an addition's files and the grown manifest are written before the revision that files its images,
and a revision's labels shorter than ``members`` (an older revision, or one read between those writes)
leave the later members as outliers. Clusterings without ``additions`` (older ones) open as before.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from cpp.errors import CppError
from cpp.result import Assignment, Cluster, ClusterResult, Edit
from cpp.store import FeatureStore

MANIFEST_FILE = "clustering.json"
READOUT_FILE = "readout.npz"
REVISIONS_DIR = "revisions"
RESULT_FILE = "result.json"
ASSIGNMENTS_FILE = "assignments.jsonl"
ASSIGNMENTS_INDEX = "assignments.idx.npy"
FEATURES_DIR = "features"
HEAD_DIR = "head"
NOVELTY_FILE = "novelty.npz"
ADDITIONS_DIR = "additions"
ADDED_MEMBERS_FILE = "members.npz"
#: Members the novelty model is fitted on, at most (a seeded random sample of larger clusterings).
NOVELTY_SAMPLE = 50_000
#: Shrinkage of the novelty model's shared covariance towards a multiple of the identity (share of its
#: mean eigenvalue added to every eigenvalue).
NOVELTY_SHRINK = 0.1
MANIFEST_VERSION = "1"
#: Label of a member marked as an outlier (it belongs to no cluster).
OUTLIER = -1


class ClusteringError(CppError):
    """A path is not a clustering, or a clustering's files are damaged."""


class Novelty(BaseModel):
    """Label-free novelty calibration: an image whose ``score`` falls below ``threshold`` fits no cluster.

    ``threshold`` is the ``quantile`` of the clustering's own members' scores: ``fit`` as measured when it
    was built, ``gaussian`` those of the members its model was not fitted on (:class:`NoveltyModel`).
    """

    score: Literal["fit", "gaussian"] = Field(
        default="fit",
        description="fit: energy of the image in its nearest cluster's subspace (1 = inside it); "
        "gaussian: minus the squared Mahalanobis distance per dimension of the image's encoder features to "
        "the nearest cluster's mean (shared covariance)",
    )
    quantile: float = Field(ge=0.0, le=1.0)
    threshold: float


class Addition(BaseModel):
    """One batch of images added to the clustering without refitting (``additions/<number>/``)."""

    number: int = Field(ge=1)
    revision: int = Field(description="The revision that filed these images under the clusters.")
    start: int = Field(description="Member row of the batch's first image.")
    rows: int = Field(description="Images the batch added.")
    source: dict[str, Any] = Field(default_factory=dict, description="Where the images came from.")
    created_at: str

    @property
    def directory(self) -> str:
        return f"{ADDITIONS_DIR}/{self.number}"


class Manifest(BaseModel):
    """``clustering.json``: what a clustering is made of, enough to reuse it on new images."""

    schema_version: str = MANIFEST_VERSION
    id: str
    created_at: str
    model: str = Field(description="Encoder spec, as `--model` takes it.")
    encoder: dict[str, Any] = Field(description="The encoder's description, preprocessing included.")
    options: dict[str, Any] = Field(description="The ClusterOptions of the run.")
    source: dict[str, Any] = Field(default_factory=dict)
    space: Literal["head", "raw"] = Field(
        description="Where centres and bases live: the head's Z, or the unit encoder features."
    )
    features: str = FEATURES_DIR
    head: str | None = HEAD_DIR
    readout: str = READOUT_FILE
    novelty: Novelty
    members: int = Field(description="Member rows: the fitted feature store's, then the additions'.")
    additions: list[Addition] = Field(
        default_factory=list, description="Batches of images added since the fit, oldest first."
    )

    @property
    def fitted_members(self) -> int:
        """Rows of the feature store the clustering was fitted on."""
        return self.members - sum(addition.rows for addition in self.additions)


class Revision(BaseModel):
    """One state of the clusters; ``edit`` is what produced it from ``parent`` (None for revision 0)."""

    revision: int
    parent: int | None = None
    created_at: str
    edit: Edit | None = None
    clusters: list[Cluster]


class ReadoutModel(BaseModel, arbitrary_types_allowed=True):
    """The arrays of ``readout.npz`` (see the module docstring)."""

    centers: np.ndarray
    bases: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray
    fit: np.ndarray


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _atomic_write_text(path: Path, text: str) -> None:
    partial = path.with_name(f"{path.name}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    partial = path.with_name(f"{path.name}.tmp.npy")
    np.save(partial, array)
    os.replace(partial, path)


def calibrate_novelty(fit: np.ndarray, quantile: float) -> Novelty:
    """The ``quantile`` of the members' own-subspace energies: members below it are the least typical."""
    threshold = float(np.quantile(fit, quantile)) if len(fit) else 0.0
    return Novelty(quantile=quantile, threshold=round(threshold, 6))


class NoveltyModel:
    """How well an image's unit encoder features fit the nearest cluster of revision 0: minus the squared
    Mahalanobis distance per dimension to that cluster's mean under the clusters' shared covariance, shrunk
    towards the identity (:data:`NOVELTY_SHRINK`). Higher scores fit better.

    Calibrated without labels by splitting the members (up to :data:`NOVELTY_SAMPLE`) in two random halves:
    the model is fitted on one and ``member_scores`` are the scores of the other, members it has not seen,
    which are scored as new images of the same clusters will be. (Scores of the members a model was fitted
    on are optimistic: with 1,280 dimensions and a few thousand members, a threshold taken from them flagged
    a quarter of new images of known classes instead of the 5 % asked for.)
    """

    def __init__(self, means: np.ndarray, whitening: np.ndarray, member_scores: np.ndarray) -> None:
        self.means = means  # (K, d) whitened means (rows of NaN for clusters without members in the half)
        self.whitening = whitening  # (d, d)
        self.member_scores = member_scores  # sorted scores of the calibration half

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, k: int, *, seed: int = 0) -> NoveltyModel:
        """The model of unit ``features`` (rows, at least 2) with cluster ``labels`` in ``0..k-1``."""
        if len(features) < 2:
            raise ClusteringError("a novelty model needs at least two members")
        x = _unit(features)
        order = np.random.default_rng(seed).permutation(len(x))
        fitted, held = np.sort(order[: len(x) // 2]), np.sort(order[len(x) // 2 :])
        model = cls(*_gaussian(x[fitted], labels[fitted], k), np.zeros(0, dtype=np.float32))
        model.member_scores = np.sort(model.score(x[held]))
        return model

    def score(self, features: np.ndarray) -> np.ndarray:
        """``(n,)`` float32 scores of raw features (normalised here)."""
        xw = _unit(features) @ self.whitening
        present = ~np.isnan(self.means[:, 0])
        means = self.means[present]
        distance = (xw * xw).sum(1)[:, None] - 2.0 * xw @ means.T + (means * means).sum(1)[None, :]
        return (-np.maximum(distance.min(1), 0.0) / xw.shape[1]).astype(np.float32)

    def calibration(self, quantile: float) -> Novelty:
        """The threshold at ``quantile`` of the members' cross-fitted scores."""
        scores = self.member_scores
        threshold = float(np.quantile(scores, quantile)) if len(scores) else 0.0
        return Novelty(score="gaussian", quantile=quantile, threshold=round(threshold, 6))

    def save(self, path: Path) -> None:
        """Write the model to ``path`` atomically (a temporary name of its own: writers may race)."""
        partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp.npz")
        np.savez(partial, means=self.means, whitening=self.whitening, member_scores=self.member_scores)
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path) -> NoveltyModel:
        with np.load(path) as data:
            return cls(data["means"], data["whitening"], data["member_scores"])


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _gaussian(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Whitened cluster means ``(k, d)`` (NaN rows for empty clusters) and the whitening ``(d, d)`` of the
    shrunk shared covariance of unit rows ``x``."""
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, x)
    means = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    residual = x - means[labels]
    covariance = (residual.T @ residual).astype(np.float64) / max(len(x), 1)
    covariance += (
        NOVELTY_SHRINK * max(np.trace(covariance) / len(covariance), 1e-12) * np.eye(len(covariance))
    )
    values, vectors = np.linalg.eigh(covariance)
    whitening = (vectors / np.sqrt(values)).astype(np.float32)
    whitened = means @ whitening
    whitened[counts == 0] = np.nan
    return whitened, whitening


class MemberStore:
    """The features of every member row, read-only: the fitted store's rows, then each addition's members
    (the part of :class:`~cpp.store.FeatureStore`'s interface that readers of members use)."""

    def __init__(self, fitted: FeatureStore, added: Sequence[tuple[FeatureStore, np.ndarray]] = ()) -> None:
        self.fitted = fitted
        self.meta = fitted.meta
        self.dim = fitted.dim
        self._added = list(added)
        self._bounds = np.cumsum([0, len(fitted), *(len(rows) for _, rows in self._added)])

    def __len__(self) -> int:
        return int(self._bounds[-1])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The float32 features of member ``rows`` (any order)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row indices must be in 0..{len(self) - 1}")
        if not self._added:
            return self.fitted.take(rows)
        which = np.searchsorted(self._bounds, rows, side="right") - 1
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for part in np.unique(which).tolist():
            selected = np.flatnonzero(which == part)
            local = rows[selected] - self._bounds[part]
            if part == 0:
                out[selected] = self.fitted.take(local)
            else:
                store, store_rows = self._added[part - 1]
                out[selected] = store.take(store_rows[local])
        return out

    def iter_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, float32 block)`` in row order; one chunk in memory at a time."""
        yield from self.fitted.iter_blocks()
        for part, (store, store_rows) in enumerate(self._added, start=1):
            for begin in range(0, len(store_rows), 4096):
                yield int(self._bounds[part]) + begin, store.take(store_rows[begin : begin + 4096])

    def features(self, dtype: np.dtype[Any] | type = np.float32) -> np.ndarray:
        """All member features as one ``(len(self), dim)`` array of ``dtype``."""
        if not self._added:
            return self.fitted.features(dtype)
        return np.concatenate([block.astype(dtype) for _, block in self.iter_blocks()], axis=0)

    def matrix(self) -> FeatureStore | np.ndarray:
        """What :func:`cpp.features.as_matrix` takes: the fitted store itself while nothing was added."""
        return self.fitted if not self._added else self.features()


def write_assignments(work_dir: Path, assignments: Iterator[dict[str, Any]], n: int) -> None:
    """JSONL of the ``n`` assignments and an index of each line's byte offset, both written atomically."""
    offsets = np.empty(n + 1, dtype=np.int64)
    partial = work_dir / f"{ASSIGNMENTS_FILE}.tmp"
    with partial.open("wb") as out:
        position = 0
        for i, record in enumerate(assignments):
            offsets[i] = position
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
            out.write(line)
            position += len(line)
        offsets[-1] = position
    index_partial = work_dir / f"{ASSIGNMENTS_INDEX}.tmp.npy"
    np.save(index_partial, offsets)
    os.replace(partial, work_dir / ASSIGNMENTS_FILE)
    os.replace(index_partial, work_dir / ASSIGNMENTS_INDEX)


def read_assignments(
    work_dir: str | Path, result: ClusterResult, *, offset: int = 0, limit: int = 100
) -> tuple[list[Assignment], int]:
    """One page of ``result``'s per-image assignments (inline or in its JSONL file), and the total count."""
    if offset < 0 or limit < 0:
        raise ClusteringError("offset and limit must be non-negative")
    if result.assignments is not None:
        return result.assignments[offset : offset + limit], len(result.assignments)
    work_dir = Path(work_dir)
    offsets = np.load(work_dir / ASSIGNMENTS_INDEX, mmap_mode="r")
    total = len(offsets) - 1
    stop = min(offset + limit, total)
    if offset >= stop:
        return [], total
    with (work_dir / (result.assignments_file or ASSIGNMENTS_FILE)).open("rb") as handle:
        handle.seek(int(offsets[offset]))
        data = handle.read(int(offsets[stop]) - int(offsets[offset]))
    return [Assignment.model_validate_json(line) for line in data.splitlines()], total


def _iter_assignments(work_dir: Path, result: ClusterResult) -> Iterator[Assignment]:
    if result.assignments is not None:
        yield from result.assignments
        return
    with (work_dir / (result.assignments_file or ASSIGNMENTS_FILE)).open("rb") as handle:
        for line in handle:
            yield Assignment.model_validate_json(line)


def create(
    work_dir: str | Path,
    *,
    manifest: Manifest,
    readout: ReadoutModel,
    result: ClusterResult,
) -> Clustering:
    """Write the artifact files of a finished run (manifest, readout, revision 0, result) into ``work_dir``.

    The per-image assignments of ``result`` must already be inline or in ``work_dir``'s JSONL file.
    Rerunning a clustering in the same directory starts its revisions again from 0.
    """
    work_dir = Path(work_dir)
    revisions = work_dir / REVISIONS_DIR
    revisions.mkdir(parents=True, exist_ok=True)
    for stale in revisions.iterdir():
        stale.unlink()
    partial = work_dir / f"{READOUT_FILE}.tmp.npz"
    np.savez(partial, **{name: getattr(readout, name) for name in ReadoutModel.model_fields})
    os.replace(partial, work_dir / READOUT_FILE)
    _atomic_save_npy(revisions / "0.labels.npy", readout.labels.astype(np.int64))
    zero = Revision(revision=0, created_at=manifest.created_at, clusters=result.clusters)
    _atomic_write_text(revisions / "0.json", zero.model_dump_json(indent=1))
    _atomic_write_text(work_dir / MANIFEST_FILE, manifest.model_dump_json(indent=1))
    _atomic_write_text(work_dir / RESULT_FILE, result.model_dump_json(indent=1))
    return Clustering(work_dir, manifest)


def new_id() -> str:
    """A fresh clustering id."""
    return uuid.uuid4().hex


def _directory_of(path: Path) -> Path:
    """The clustering directory named by ``path``: the directory itself, or the one a result JSON names."""
    if path.is_dir():
        return path
    if path.is_file():
        if (path.parent / MANIFEST_FILE).is_file():
            return path.parent
        try:
            result = ClusterResult.model_validate_json(path.read_text(encoding="utf-8"))
        except (ValidationError, UnicodeDecodeError) as exc:
            raise ClusteringError(f"{path} is not a cpp result JSON: {exc.__class__.__name__}") from exc
        if result.run.work_dir:
            return Path(result.run.work_dir)
        raise ClusteringError(
            f"{path} does not say which work directory made it (older result): pass the work directory"
        )
    raise ClusteringError(f"{path} does not exist: pass a `cpp cluster` work directory or its result JSON")


def open(path: str | Path) -> Clustering:
    """The clustering at ``path``: a ``cpp cluster`` work directory, a job's folder, or a result JSON."""
    directory = _directory_of(Path(path))
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ClusteringError(
            f"{directory} is not a finished clustering ({MANIFEST_FILE} is missing): run `cpp cluster` "
            "with this work directory, or wait for the job to finish"
        )
    try:
        manifest = Manifest.model_validate_json(manifest_path.read_text(encoding="utf-8"))
    except (ValidationError, UnicodeDecodeError) as exc:
        raise ClusteringError(
            f"{manifest_path} is damaged ({exc.__class__.__name__}); rerun `cpp cluster` in {directory}"
        ) from exc
    if manifest.schema_version != MANIFEST_VERSION:
        raise ClusteringError(
            f"{manifest_path} has schema version {manifest.schema_version}, this cpp reads "
            f"{MANIFEST_VERSION}: rerun `cpp cluster` in {directory}"
        )
    return Clustering(directory, manifest)


class Clustering:
    """An opened clustering directory (see the module docstring); :func:`open` makes one."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    @property
    def id(self) -> str:
        return self.manifest.id

    def revisions(self) -> list[int]:
        """Committed revision numbers, oldest first."""
        numbers = (
            int(p.name.removesuffix(".json"))
            for p in (self.path / REVISIONS_DIR).glob("*.json")
            if p.name.removesuffix(".json").isdigit()
        )
        return sorted(numbers)

    @property
    def revision(self) -> int:
        """The newest revision."""
        found = self.revisions()
        if not found:
            raise ClusteringError(f"{self.path / REVISIONS_DIR} holds no revision: rerun `cpp cluster`")
        return found[-1]

    def state(self, revision: int | None = None) -> Revision:
        """Revision ``revision`` (default: the newest)."""
        number = self.revision if revision is None else revision
        path = self.path / REVISIONS_DIR / f"{number}.json"
        if not path.is_file():
            raise ClusteringError(f"revision {number} does not exist; revisions are {self.revisions()}")
        return Revision.model_validate_json(path.read_text(encoding="utf-8"))

    def labels(self, revision: int | None = None) -> np.ndarray:
        """Every member's cluster in ``revision`` (member row order; :data:`OUTLIER` for outliers, and for
        members added after ``revision``)."""
        number = self.revision if revision is None else revision
        labels = np.load(self.path / REVISIONS_DIR / f"{number}.labels.npy")
        missing = self.manifest.members - len(labels)
        if missing > 0:
            labels = np.concatenate([labels, np.full(missing, OUTLIER, dtype=labels.dtype)])
        return labels

    def edits(self) -> list[Edit]:
        """The edit log: what made every revision after 0, oldest first."""
        return [edit for n in self.revisions() if (edit := self.state(n).edit) is not None]

    def result(self) -> ClusterResult:
        """The result of the newest revision."""
        return ClusterResult.model_validate_json((self.path / RESULT_FILE).read_text(encoding="utf-8"))

    def assignments(self, *, offset: int = 0, limit: int = 100) -> tuple[list[Assignment], int]:
        """One page of the newest revision's per-image assignments, and the total count."""
        return read_assignments(self.path, self.result(), offset=offset, limit=limit)

    def novelty_model(self) -> NoveltyModel:
        """The novelty model (``novelty.npz``), fitted on the members and revision 0's clusters when first
        asked for and saved for later calls."""
        path = self.path / NOVELTY_FILE
        if path.is_file():
            return NoveltyModel.load(path)
        store = FeatureStore.open(self.path / self.manifest.features)
        labels = self.readout().labels
        rows = np.arange(len(store))
        if len(rows) > NOVELTY_SAMPLE:
            rows = np.sort(np.random.default_rng(0).choice(len(rows), size=NOVELTY_SAMPLE, replace=False))
        model = NoveltyModel.fit(store.take(rows), labels[rows], len(self.readout().centers))
        with contextlib.suppress(OSError):  # a read-only clustering: usable, the model is fitted every call
            model.save(path)
        return model

    def member_store(self) -> MemberStore:
        """The features of every member (:class:`MemberStore`)."""
        fitted = FeatureStore.open(self.path / self.manifest.features)
        added = []
        for addition in self.manifest.additions:
            directory = self.path / addition.directory
            with np.load(directory / ADDED_MEMBERS_FILE) as data:
                added.append((FeatureStore.open(directory / FEATURES_DIR), data["store_rows"]))
        return MemberStore(fitted, added)

    def _added(self, name: str) -> list[np.ndarray]:
        arrays = []
        for addition in self.manifest.additions:
            with np.load(self.path / addition.directory / ADDED_MEMBERS_FILE) as data:
                arrays.append(data[name])
        return arrays

    def member_confidence(self) -> np.ndarray:
        """Every member's confidence: the readout's for fitted members, the assignment's for added ones."""
        return np.concatenate([self.readout().confidence, *self._added("confidence")]).astype(np.float32)

    def novel_pool(self, revision: int | None = None) -> np.ndarray:
        """Rows of the added images that fitted no cluster and are in none in ``revision`` (default: the
        newest): the pool of novel images, left out of every cluster."""
        flags = np.zeros(self.manifest.members, dtype=bool)
        for addition, novel in zip(self.manifest.additions, self._added("novel"), strict=True):
            flags[addition.start : addition.start + addition.rows] = novel
        return np.flatnonzero(flags & (self.labels(revision) == OUTLIER))

    def grow(
        self,
        features: Path,
        store_rows: np.ndarray,
        labels: np.ndarray,
        confidence: np.ndarray,
        novel: np.ndarray,
        assignments: Sequence[Assignment],
        clusters: Sequence[Cluster],
        edit: Edit,
        source: dict[str, Any],
    ) -> int:
        """Add rows ``store_rows`` of the feature store at ``features`` as members (copied into
        ``additions/<n>/``) with the newest revision's ``labels`` (:data:`OUTLIER` for the novel ones),
        their ``confidence``, ``novel`` flags and ``assignments``, and commit the next revision with the
        ``clusters`` (sizes and representatives recounted by the caller); returns its number.

        The caller holds the edit lock. A batch left by an update that stopped before its revision is
        removed first.
        """
        self.discard_uncommitted()
        count = len(store_rows)
        if not (len(labels) == len(confidence) == len(novel) == len(assignments) == count) or not count:
            raise ClusteringError("an addition needs the same positive number of rows, labels and flags")
        number = len(self.manifest.additions) + 1
        addition = Addition(
            number=number,
            revision=self.revision + 1,
            start=self.manifest.members,
            rows=count,
            source=source,
            created_at=_now(),
        )
        target = self.path / addition.directory
        partial = target.with_name(f".{number}.partial")
        for stale in (partial, target):
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir(parents=True)
        shutil.copytree(features, partial / FEATURES_DIR)
        np.savez(
            partial / ADDED_MEMBERS_FILE,
            store_rows=np.asarray(store_rows, dtype=np.int64),
            confidence=np.asarray(confidence, dtype=np.float32),
            novel=np.asarray(novel, dtype=bool),
        )
        os.replace(partial, target)
        old_labels = self.labels()
        grown = self.manifest.model_copy(
            update={
                "members": self.manifest.members + count,
                "additions": [*self.manifest.additions, addition],
            }
        )
        _atomic_write_text(self.path / MANIFEST_FILE, grown.model_dump_json(indent=1))
        self.manifest = grown
        all_labels = np.concatenate([old_labels, np.asarray(labels, dtype=np.int64)])
        return self.commit(all_labels, clusters, edit, appended=assignments)

    def discard_uncommitted(self) -> None:
        """Drop additions whose revision was never committed (an update that stopped half-way); the caller
        holds the edit lock."""
        newest = self.revision
        kept = [a for a in self.manifest.additions if a.revision <= newest]
        if len(kept) == len(self.manifest.additions):
            return
        dropped = self.manifest.additions[len(kept) :]
        members = self.manifest.members - sum(a.rows for a in dropped)
        manifest = self.manifest.model_copy(update={"members": members, "additions": kept})
        _atomic_write_text(self.path / MANIFEST_FILE, manifest.model_dump_json(indent=1))
        self.manifest = manifest
        for addition in dropped:
            shutil.rmtree(self.path / addition.directory, ignore_errors=True)

    def readout(self) -> ReadoutModel:
        """Centres, bases and the members' revision-0 labels, confidences and fits."""
        with np.load(self.path / self.manifest.readout) as data:
            return ReadoutModel(**{name: data[name] for name in ReadoutModel.model_fields})

    def commit(
        self,
        labels: np.ndarray,
        clusters: Sequence[Cluster],
        edit: Edit,
        *,
        appended: Sequence[Assignment] = (),
    ) -> int:
        """Write the next revision (members' ``labels``, the ``clusters``, the ``edit`` that made them) and
        rewrite the result to it; returns the new revision number.

        ``clusters`` are the new revision's clusters with ids 0..K-1; ``labels`` must use those ids (or
        :data:`OUTLIER`) for every member. ``appended`` are the assignments of members the result does not
        list yet (the last rows, just added by :meth:`grow`).
        """
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (self.manifest.members,):
            raise ClusteringError(
                f"a revision labels all {self.manifest.members} members, got {labels.shape}"
            )
        if [c.id for c in clusters] != list(range(len(clusters))):
            raise ClusteringError("a revision's clusters must have ids 0..K-1 in order")
        if labels.size and (labels.max() >= len(clusters) or labels.min() < OUTLIER):
            raise ClusteringError("a revision's labels must be cluster ids or OUTLIER")
        parent = self.revision
        number = parent + 1
        edit = edit.model_copy(update={"revision": number, "at": edit.at or _now()})
        revisions = self.path / REVISIONS_DIR
        _atomic_save_npy(revisions / f"{number}.labels.npy", labels)
        state = Revision(
            revision=number, parent=parent, created_at=_now(), edit=edit, clusters=list(clusters)
        )
        _atomic_write_text(revisions / f"{number}.json", state.model_dump_json(indent=1))
        self._rewrite_result(labels, list(clusters), appended)
        return number

    def restore(self, revision: int) -> int:
        """A new revision with ``revision``'s state; returns its number."""
        old = self.state(revision)
        return self.commit(
            self.labels(revision), old.clusters, Edit(op="restore", args={"revision": revision})
        )

    def _rewrite_result(
        self, labels: np.ndarray, clusters: list[Cluster], appended: Sequence[Assignment]
    ) -> None:
        """The result of the newest revision: its clusters, the edits, and every assignment's cluster
        (``appended`` ones after those the result lists)."""
        result = self.result()
        cluster_of = labels.tolist()

        def revised() -> Iterator[dict[str, Any]]:
            every = itertools.chain(_iter_assignments(self.path, result), appended)
            for i, assignment in enumerate(every):
                yield assignment.model_copy(update={"cluster": cluster_of[i]}).model_dump()

        updated = {"clusters": clusters, "revision": self.revision, "edits": self.edits()}
        if result.assignments is not None:
            updated["assignments"] = [Assignment.model_validate(a) for a in revised()]
        else:
            write_assignments(self.path, revised(), len(labels))
        _atomic_write_text(
            self.path / RESULT_FILE, result.model_copy(update=updated).model_dump_json(indent=1)
        )
