"""Curation of a clustering: rename, merge, move, split and mark outliers, each committed as a new revision.

Every function takes an opened :class:`~cpp.clustering.Clustering`, checks its arguments against the newest
revision (:class:`CurationError` with a one-line reason otherwise), computes the members' new labels and the
new clusters (sizes and representatives recomputed) and commits them with the :class:`~cpp.result.Edit` that
describes the step. Edits of one clustering are serialised by a lock file in its folder; ``expected`` (the
revision the caller looked at) turns a concurrent edit into :class:`RevisionConflict` instead of a silent
overwrite. Cluster ids of a revision are always 0..K-1: a merge, or a move or outlier mark that empties a
cluster, renumbers the clusters after it.

:class:`Members` is the per-row view (keys, display paths, readout confidence) the curation, the gallery and
the thumbnails share; it is read once per clustering from its assignments (store row order) and cached.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cpp.clustering import ASSIGNMENTS_FILE, OUTLIER, Clustering, MemberStore
from cpp.errors import CppError
from cpp.result import Cluster, Edit, NameScore

#: Representatives listed per cluster when an edit recomputes them (as the pipeline lists).
REPRESENTATIVES = 5
#: Longest cluster name.
MAX_NAME_CHARS = 200
#: Most parts a split may make.
MAX_SPLIT = 20
#: Below this many members a split uses k-means on the features instead of spectral clustering.
SPECTRAL_MIN = 30
LOCK_FILE = ".curation.lock"
_CACHE_SIZE = 8


class CurationError(CppError):
    """An edit cannot be made with these arguments (the message says which and why)."""


class RevisionConflict(CurationError):
    """The clustering moved on since the revision the edit was made against."""


@dataclass
class Members:
    """Per store row of a clustering: key, path (None for members only known by key), readout confidence."""

    keys: list[str]
    paths: list[str | None]
    confidence: np.ndarray
    _by_shown: dict[str, int] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    def shown(self, row: int) -> str:
        """What the result lists for ``row`` (as representatives): its path, else its key."""
        return self.paths[row] or self.keys[row]

    def row_of(self, shown: str) -> int | None:
        """The row a representative entry names (None if none does)."""
        if self._by_shown is None:
            self._by_shown = {self.shown(row): row for row in range(len(self.keys))}
        return self._by_shown.get(shown)

    def check_rows(self, rows: Sequence[int], what: str = "rows") -> np.ndarray:
        """``rows`` as a unique int64 array of valid row indices (:class:`CurationError` otherwise)."""
        array = np.unique(np.asarray(list(rows), dtype=np.int64))
        if array.size == 0:
            raise CurationError(f"{what}: select at least one image")
        if array[0] < 0 or array[-1] >= len(self):
            raise CurationError(f"{what}: row indices must be in 0..{len(self) - 1}")
        return array


_members_cache: OrderedDict[tuple[str, str, int], Members] = OrderedDict()
_members_lock = threading.Lock()


def open_store(cl: Clustering) -> MemberStore:
    """The features of the clustering's members (the fitted store's rows, then added ones)."""
    return cl.member_store()


def members(cl: Clustering) -> Members:
    """The :class:`Members` of ``cl``, read once per process (a few recent clusterings are kept)."""
    cache_key = (str(cl.path.resolve()), cl.id, cl.manifest.members)  # members only grow
    with _members_lock:
        found = _members_cache.get(cache_key)
        if found is not None:
            _members_cache.move_to_end(cache_key)
            return found
    keys: list[str] = []
    paths: list[str | None] = []
    result = cl.result()
    if result.assignments is not None:
        keys = [a.key for a in result.assignments]
        paths = [a.path for a in result.assignments]
    else:  # one JSON object per line, in store row order, parsed as one array (a raw newline ends a line)
        text = (cl.path / (result.assignments_file or ASSIGNMENTS_FILE)).read_text(encoding="utf-8")
        records = json.loads("[" + text.rstrip("\n").replace("\n", ",") + "]")
        keys = [record["key"] for record in records]
        paths = [record.get("path") for record in records]
    found = Members(keys, paths, cl.member_confidence())
    with _members_lock:
        _members_cache[cache_key] = found
        while len(_members_cache) > _CACHE_SIZE:
            _members_cache.popitem(last=False)
    return found


@contextmanager
def edit_lock(cl: Clustering) -> Iterator[None]:
    """Hold the clustering's edit lock (other processes and threads wait)."""
    fd = os.open(cl.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass
class _Draft:
    """The newest revision's labels and clusters, edited in place before commit."""

    labels: np.ndarray
    clusters: list[Cluster]


def _begin(cl: Clustering, expected: int | None) -> _Draft:
    current = cl.revision
    if expected is not None and expected != current:
        raise RevisionConflict(
            f"the clustering is at revision {current}, not {expected}: reload it and repeat the edit"
        )
    return _Draft(cl.labels().copy(), [c.model_copy(deep=True) for c in cl.state().clusters])


def _check_cluster(draft: _Draft, cluster: int, what: str = "cluster") -> int:
    if not isinstance(cluster, int) or not 0 <= cluster < len(draft.clusters):
        raise CurationError(f"{what} {cluster!r} does not exist; clusters are 0..{len(draft.clusters) - 1}")
    return cluster


def clean_name(name: str) -> str:
    """A cluster name as stored: whitespace collapsed, 1..200 characters, no control characters."""
    if not isinstance(name, str):
        raise CurationError("name must be text")
    text = " ".join(name.split())
    if not text:
        raise CurationError("name must not be empty")
    if len(text) > MAX_NAME_CHARS:
        raise CurationError(f"name is {len(text)} characters long; the limit is {MAX_NAME_CHARS}")
    if any(unicodedata.category(ch) in ("Cc", "Cf") for ch in text):
        raise CurationError("name must not contain control or format characters")
    return text


def _best_rows(rows: np.ndarray, mem: Members, count: int, exclude: set[int]) -> list[int]:
    """Up to ``count`` of ``rows`` with the highest readout confidence (``exclude`` left out)."""
    if exclude:
        rows = rows[~np.isin(rows, np.fromiter(exclude, dtype=np.int64))]
    order = np.argsort(-mem.confidence[rows], kind="stable")[:count]
    return rows[order].tolist()


def _refill(draft: _Draft, mem: Members, touched: set[int]) -> None:
    """Recompute sizes of every cluster, and the representatives of ``touched`` ones: the old ones that are
    still members, then the most confident other members."""
    sizes = np.bincount(draft.labels[draft.labels >= 0], minlength=len(draft.clusters))
    for cluster in draft.clusters:
        cluster.size = int(sizes[cluster.id])
        if cluster.id not in touched:
            continue
        kept = [
            shown
            for shown in cluster.representatives
            if (row := mem.row_of(shown)) is not None and draft.labels[row] == cluster.id
        ]
        want = max(REPRESENTATIVES, len(cluster.representatives))
        if len(kept) < want:
            rows = np.flatnonzero(draft.labels == cluster.id)
            have = {mem.row_of(shown) for shown in kept}
            extra = _best_rows(rows, mem, want - len(kept), {r for r in have if r is not None})
            kept.extend(mem.shown(row) for row in extra)
        cluster.representatives = kept


def _drop_empty(draft: _Draft) -> dict[int, int]:
    """Remove clusters without members and renumber the rest 0..K-1; returns old id -> new id."""
    sizes = np.bincount(draft.labels[draft.labels >= 0], minlength=len(draft.clusters))
    kept = [c for c in draft.clusters if sizes[c.id] > 0]
    mapping = {c.id: new for new, c in enumerate(kept)}
    if len(kept) != len(draft.clusters):
        lookup = np.full(len(draft.clusters) + 1, OUTLIER, dtype=np.int64)  # last slot: OUTLIER stays
        for old, new in mapping.items():
            lookup[old] = new
        draft.labels = lookup[draft.labels]
        for c in kept:
            c.id = mapping[c.id]
        draft.clusters = kept
    return mapping


@dataclass(frozen=True)
class Outcome:
    """What an edit produced: the new revision, and the ids (in it) of the clusters it made or changed."""

    revision: int
    clusters: list[int]


def _commit(cl: Clustering, draft: _Draft, op: str, args: dict[str, Any], changed: list[int]) -> Outcome:
    if not draft.clusters:
        raise CurationError("an edit cannot leave the clustering without clusters")
    number = cl.commit(draft.labels, draft.clusters, Edit(op=op, args=args))  # type: ignore[arg-type]
    return Outcome(number, changed)


def rename(cl: Clustering, cluster: int, name: str, *, expected: int | None = None) -> Outcome:
    """Name ``cluster`` ``name``: free text, or one of its alternatives (which then takes that name's score,
    and the old name becomes an alternative)."""
    text = clean_name(name)
    with edit_lock(cl):
        draft = _begin(cl, expected)
        target = draft.clusters[_check_cluster(draft, cluster)]
        chosen = next((a for a in target.alternatives if a.name == text), None)
        if chosen is not None:
            rest = [a for a in target.alternatives if a.name != text]
            target.alternatives = [NameScore(name=target.name, score=target.score), *rest]
            target.score = chosen.score
        target.name = text
        target.uncertain = False  # a person chose it
        args = {"cluster": cluster, "name": text, "source": "alternative" if chosen else "text"}
        return _commit(cl, draft, "rename", args, [cluster])


def merge(
    cl: Clustering, clusters: Sequence[int], *, name: str | None = None, expected: int | None = None
) -> Outcome:
    """Merge ``clusters`` (two or more) into the first one listed, which keeps its name unless ``name``."""
    ids = list(dict.fromkeys(clusters))
    if len(ids) < 2:
        raise CurationError("merge needs at least two different clusters")
    text = clean_name(name) if name is not None else None
    mem = members(cl)
    with edit_lock(cl):
        draft = _begin(cl, expected)
        for c in ids:
            _check_cluster(draft, c)
        into = ids[0]
        draft.labels[np.isin(draft.labels, ids[1:])] = into
        target = draft.clusters[into]
        pools = [
            draft.clusters[c].representatives for c in sorted(ids, key=lambda c: -draft.clusters[c].size)
        ]
        target.representatives = [rep for group in zip(*_padded(pools), strict=True) for rep in group if rep][
            : max(REPRESENTATIVES, len(target.representatives))
        ]
        if text is not None:
            target.name, target.uncertain = text, False
        _refill(draft, mem, {into})
        mapping = _drop_empty(draft)
        args: dict[str, Any] = {"clusters": ids}
        if text is not None:
            args["name"] = text
        return _commit(cl, draft, "merge", args, [mapping[into]])


def _padded(groups: list[list[str]]) -> list[list[str]]:
    width = max((len(g) for g in groups), default=0)
    return [g + [""] * (width - len(g)) for g in groups]


def move(cl: Clustering, rows: Sequence[int], to: int, *, expected: int | None = None) -> Outcome:
    """Move the images ``rows`` (store row indices; outliers too) to cluster ``to``."""
    mem = members(cl)
    selected = mem.check_rows(rows)
    with edit_lock(cl):
        draft = _begin(cl, expected)
        _check_cluster(draft, to, "target cluster")
        touched = {int(c) for c in np.unique(draft.labels[selected]) if c >= 0} | {to}
        draft.labels[selected] = to
        _refill(draft, mem, touched)
        mapping = _drop_empty(draft)
        return _commit(cl, draft, "move", {"rows": selected.tolist(), "to": to}, [mapping[to]])


def mark_outliers(cl: Clustering, rows: Sequence[int], *, expected: int | None = None) -> Outcome:
    """Take the images ``rows`` out of their clusters (label :data:`~cpp.clustering.OUTLIER`)."""
    mem = members(cl)
    selected = mem.check_rows(rows)
    with edit_lock(cl):
        draft = _begin(cl, expected)
        touched = {int(c) for c in np.unique(draft.labels[selected]) if c >= 0}
        draft.labels[selected] = OUTLIER
        _refill(draft, mem, touched)
        mapping = _drop_empty(draft)
        return _commit(
            cl,
            draft,
            "outlier",
            {"rows": selected.tolist()},
            sorted(mapping[c] for c in touched if c in mapping),
        )


def restore(cl: Clustering, revision: int, *, expected: int | None = None) -> Outcome:
    """A new revision with the state of ``revision``."""
    with edit_lock(cl):
        current = cl.revision
        if expected is not None and expected != current:
            raise RevisionConflict(
                f"the clustering is at revision {current}, not {expected}: reload it and repeat the edit"
            )
        if revision not in cl.revisions():
            raise CurationError(f"revision {revision} does not exist; revisions are 0..{current}")
        number = cl.restore(revision)
        return Outcome(number, list(range(len(cl.state(number).clusters))))


def _member_space(cl: Clustering, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(Z, C)`` of ``rows`` in the readout's space: the head's subspace features and cluster codes, or for a
    clustering made without a head the unit encoder features and graph rows made from them as the features'
    readout makes its own (:func:`cpp.readout.graph_rows`, centred on these rows' mean)."""
    from cpp.knn import normalize_rows
    from cpp.readout import graph_rows

    store = open_store(cl)
    x = store.take(rows)
    head_dir = cl.path / cl.manifest.head if cl.manifest.head else None
    if cl.manifest.space == "head" and head_dir is not None and head_dir.is_dir():
        from cpp.head_model import FittedHead

        fitted = FittedHead.load(head_dir, device="cpu")
        z, c = fitted.encode(rows, x, fitted.context(store.matrix()))
        return normalize_rows(z), c
    unit = normalize_rows(x)
    return unit, graph_rows(unit)[0]


def split_labels(z: np.ndarray, codes: np.ndarray, parts: int, *, seed: int = 0) -> np.ndarray:
    """Labels 0..parts-1 of the rows (largest part first): the readout's spectral clustering of the codes,
    or spherical k-means of ``z`` for few rows."""
    from cpp.readout import kmeans, spectral_embedding, spectral_labels

    if len(z) < max(SPECTRAL_MIN, 3 * parts):
        labels = kmeans(z, parts, seed=seed)
    else:
        labels = spectral_labels(spectral_embedding(codes, parts), parts, seed)
    counts = np.bincount(labels, minlength=parts)
    order = np.argsort(-counts, kind="stable")
    order = order[counts[order] > 0]
    mapping = np.full(len(counts), -1, dtype=np.int64)
    mapping[order] = np.arange(len(order))
    return mapping[labels]


def split(cl: Clustering, cluster: int, parts: int, *, seed: int = 0, expected: int | None = None) -> Outcome:
    """Split ``cluster`` into ``parts`` by re-running the readout's clustering on its members (in the head's
    space when the clustering has a head). The largest part keeps the id; the others are appended. The parts
    are named after the cluster with a number (rename them); their representatives are the members nearest
    each part's centre."""
    if not isinstance(parts, int) or not 2 <= parts <= MAX_SPLIT:
        raise CurationError(f"parts must be a whole number in 2..{MAX_SPLIT}, got {parts!r}")
    mem = members(cl)
    with edit_lock(cl):
        draft = _begin(cl, expected)
        source = draft.clusters[_check_cluster(draft, cluster)]
        rows = np.flatnonzero(draft.labels == cluster)
        if len(rows) < 2 * parts:
            raise CurationError(
                f"cluster {cluster} has {len(rows)} images; splitting into {parts} needs at least {2 * parts}"
            )
        z, codes = _member_space(cl, rows)
        local = split_labels(z, codes, parts, seed=seed)
        made = int(local.max()) + 1
        if made < 2:
            raise CurationError(f"cluster {cluster} could not be split: all its images fell into one part")
        count = max(REPRESENTATIVES, len(source.representatives))
        ids = [cluster, *range(len(draft.clusters), len(draft.clusters) + made - 1)]
        base = source.name
        for part in range(made):
            in_part = local == part
            centre = z[in_part].mean(0)
            closeness = z[in_part] @ centre
            nearest = rows[in_part][np.argsort(-closeness, kind="stable")[:count]]
            piece = source.model_copy(
                update={
                    "id": ids[part],
                    "size": int(in_part.sum()),
                    "name": clean_name(f"{base} ({part + 1})"),
                    "uncertain": True,
                    "representatives": [mem.shown(int(r)) for r in nearest],
                    "alternatives": [a.model_copy() for a in source.alternatives],
                }
            )
            if part == 0:
                draft.clusters[cluster] = piece
            else:
                draft.clusters.append(piece)
            draft.labels[rows[in_part]] = ids[part]
        args = {"cluster": cluster, "parts": parts, "seed": seed, "made": made}
        return _commit(cl, draft, "split", args, ids)
