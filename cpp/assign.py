"""Assigning new images to an existing clustering: its encoder, its head, its clusters and their names.

:func:`assign` embeds the images of a source with the clustering's own encoder and preprocessing (another
encoder, other weights or other preprocessing are refused), passes them through its head with context
neighbours taken from the clustering's members (never from the other new images), and files each image under
the cluster of the newest revision whose subspace holds most of its energy: the rule by which the readout
itself assigns the rows it did not cluster directly. An image that the clustering already holds (its
features equal a member's) gets that member's cluster of the newest revision, so the clustering's own images
are assigned as it groups them, edits included. ``novel`` marks an image whose novelty score (how well its
encoder features fit the nearest cluster's Gaussian, :class:`cpp.clustering.NoveltyModel`) falls below the
threshold calibrated on the members without labels: the quantile ``novelty_quantile`` (default: the
clustering's) of their cross-fitted scores. The head's own subspace energy is no novelty signal: the
rate-reduction head maps images of unseen classes into the clusters' subspaces as well as seen ones.

The work directory holds, like a ``cpp cluster`` run::

    features/            the new images' feature store (cpp.store): resumable, bad files skipped with reasons
    assignments.jsonl    one :class:`NewImage` per embedded image, in source order (written atomically)
    assignments.idx.npy  byte offset of every line, for paging (:func:`read_results`)
    summary.json         :class:`AssignSummary`: images per cluster, novel share, drift of the confidences

:func:`update` (``cpp assign --update``) then adds the assigned images to the clustering as members of a
new revision without refitting (novel ones to its novel pool); see :meth:`cpp.clustering.Clustering.grow`.

Memory is one chunk of new images plus what the clustering needs for its context neighbours (the members'
reference rows, as when it was fitted) and O(members) labels; an interrupted run resumes its embedding.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field

from cpp import clustering as clusterings
from cpp import curation
from cpp.clustering import OUTLIER, Clustering, ClusteringError, MemberStore
from cpp.embed import embed_source
from cpp.encoders import Encoder, create_encoder
from cpp.engines import EmbedEngine
from cpp.errors import CppError
from cpp.head_model import REFERENCE_MAX, ContextTokens, FittedHead
from cpp.heads import Tokens, TokenSets
from cpp.knn import EXACT_MAX, build_index, normalize_rows
from cpp.logging import get_logger
from cpp.options import AssignOptions, SourceSpec
from cpp.progress import RunControl
from cpp.readout import subspace_scores
from cpp.result import Assignment, Cluster, Edit, SkippedFile
from cpp.sources import Roots, resolved_spec
from cpp.store import FeatureStore, StoreError

log = get_logger("assign")

FEATURES_DIR = "features"
RESULTS_FILE = clusterings.ASSIGNMENTS_FILE
RESULTS_INDEX = clusterings.ASSIGNMENTS_INDEX
SUMMARY_FILE = "summary.json"
#: An image whose unit features have at least this cosine similarity with a member's is that member (the
#: same image embedded in batches of another size differs by up to 1.2e-4 in cosine with the offline
#: encoder on the CPU; distinct photos of one CIFAR-10 class stay below 0.77).
MEMBER_SIMILARITY = 0.999
#: Encoder description fields that may differ between the clustering and the new images: where and at which
#: precision the encoder runs, and where its weights file lies (its tag and size must match).
_RUNTIME_FIELDS = ("device", "precision")
_WEIGHTS_LOCATION = ("file", "mtime")


class AssignError(CppError):
    """New images cannot be assigned to this clustering (another encoder, no usable images, ...)."""


class NewImage(BaseModel):
    """One new image: the cluster of the newest revision it is filed under, and whether it fits none."""

    key: str
    path: str | None = None
    cluster: int = Field(description="The nearest cluster of the newest revision (also for novel images).")
    name: str = Field(description="That cluster's current name.")
    confidence: float = Field(description="Score margin over the runner-up cluster, in [0, 1].")
    novel: bool = Field(description="True when the image fits no cluster (score below the threshold).")
    score: float = Field(description="Novelty score: the higher, the better the image fits its cluster.")
    member: bool = Field(description="The clustering already holds this image (its cluster is kept).")
    true_label: str | None = Field(default=None, description="Ground truth from the source, when known.")


class ClusterDrift(BaseModel):
    """How the new images of one cluster compare with its members."""

    id: int
    name: str
    members: int = Field(description="Members of the cluster in the newest revision.")
    member_confidence: float | None = Field(description="Mean confidence of the members (as fitted).")
    assigned: int = Field(description="New images filed under the cluster (novel ones included).")
    novel: int = Field(description="Of those, images flagged novel.")
    confidence: float | None = Field(description="Mean confidence of the new images filed under it.")


class AssignSummary(BaseModel):
    """The outcome of one assignment run (``summary.json``)."""

    clustering: dict[str, Any] = Field(description="Id, path and revision of the clustering assigned to.")
    source: dict[str, Any]
    items: int = Field(description="Items the source yielded.")
    embedded: int = Field(description="Images embedded and assigned.")
    skipped: list[SkippedFile] = Field(default_factory=list)
    members: int = Field(description="New images that the clustering already holds.")
    novel: int
    novel_share: float
    novelty: clusterings.Novelty = Field(description="The calibration used (threshold on the score).")
    clusters: list[ClusterDrift]
    timings_s: dict[str, float] = Field(default_factory=dict)
    results_file: str = RESULTS_FILE
    created_at: str


def comparable_encoder(description: dict[str, Any]) -> dict[str, Any]:
    """An encoder description without what may differ between runs of the same encoder (device, precision,
    location of the weights file)."""
    as_json = json.loads(json.dumps(description, default=str))  # tuples as lists, as the manifest holds them
    kept = {key: value for key, value in as_json.items() if key not in _RUNTIME_FIELDS}
    weights = kept.get("weights")
    if isinstance(weights, dict):
        kept["weights"] = {key: value for key, value in weights.items() if key not in _WEIGHTS_LOCATION}
    return kept


def encoder_mismatch(expected: dict[str, Any], actual: dict[str, Any]) -> str | None:
    """How encoder description ``actual`` differs from ``expected`` (None when they match)."""
    want, have = comparable_encoder(expected), comparable_encoder(actual)
    fields = [key for key in sorted(set(want) | set(have)) if want.get(key) != have.get(key)]
    if not fields:
        return None
    return "; ".join(f"{key}: clustering {want.get(key)!r}, here {have.get(key)!r}" for key in fields)


def clustering_encoder(found: Clustering, device: str = "auto") -> Encoder:
    """The encoder the clustering was made with, built here; :class:`AssignError` when it is unavailable or
    differs (weights, preprocessing)."""
    spec = str(found.manifest.encoder.get("id") or found.manifest.model)
    try:
        encoder = create_encoder(spec, device=device)
    except CppError as exc:
        raise AssignError(f"the clustering's encoder {spec!r} cannot be built here: {exc}") from exc
    check_encoder(found, encoder)
    return encoder


def check_encoder(found: Clustering, encoder: Encoder) -> None:
    """:class:`AssignError` unless ``encoder`` is the clustering's encoder with the same preprocessing."""
    mismatch = encoder_mismatch(found.manifest.encoder, encoder.describe())
    if mismatch:
        raise AssignError(
            f"the clustering {found.path} was made with another encoder or preprocessing ({mismatch}); "
            "new images must be embedded as its members were"
        )


class _MemberContext(ContextTokens):
    """Context tokens of new images: each image followed by given neighbours among the members' reference
    rows (a block at a time), never by other new images."""

    def __init__(self, reference: torch.Tensor, neighbours: np.ndarray) -> None:
        self.k = neighbours.shape[1]
        self._members = reference
        self._block = neighbours

    def tokens(self, rows: np.ndarray, x: np.ndarray) -> Tokens:
        own = torch.from_numpy(x)
        if self.k == 0:
            return own.unsqueeze(1)
        return TokenSets.with_context(own, self._members, torch.from_numpy(self._block[rows]))


@dataclass
class _Scored:
    """One block of new images, scored against the newest revision."""

    cluster: np.ndarray  # (B,) current cluster ids
    confidence: np.ndarray  # (B,) float
    score: np.ndarray  # (B,) novelty score (higher: fits better)
    member: np.ndarray  # (B,) bool: the image is a member
    novel: np.ndarray  # (B,) bool
    energy: np.ndarray  # (B,) energy in the nearest subspace (the head's own fit; no novelty signal)


class Assigner:
    """Scores unit features against a clustering's newest revision (see the module docstring).

    Holds the fitted head (in head space), the members' reference rows with a search index over them (for
    context neighbours and member look-up), the revision-0 subspaces and their map onto the newest
    revision's clusters.
    """

    def __init__(self, found: Clustering, *, device: str = "auto", novelty_quantile: float | None = None):
        self.clustering = found
        manifest = found.manifest
        self.members = _members_store(found)
        if len(self.members) != manifest.members:
            raise ClusteringError(
                f"{found.path}: the feature store has {len(self.members)} rows, the clustering "
                f"{manifest.members}; rerun `cpp cluster` there"
            )
        readout = found.readout()
        self.fitted: FittedHead | None = None
        if manifest.space == "head":
            if manifest.head is None:
                raise ClusteringError(f"{found.path}: a head-space clustering without a head directory")
            self.fitted = FittedHead.load(found.path / manifest.head, device=device)
        self.k = self.fitted.head_config.context_k if self.fitted else 0
        self._reference_setup(seed=self.fitted.fit_config.seed if self.fitted else 0)
        self.bases = torch.from_numpy(np.ascontiguousarray(readout.bases, dtype=np.float32))
        state = found.state()
        self.revision = state.revision
        self.names = [cluster.name for cluster in state.clusters]
        self.labels = found.labels()
        fitted_labels = self.labels[: len(readout.labels)]  # added members have no revision-0 cluster
        self.mapping = revision_map(readout.labels, fitted_labels, len(readout.bases), len(self.names))
        if not (self.mapping >= 0).any():
            raise AssignError(f"the newest revision of {found.path} has no cluster left to assign to")
        self.novelty_model = found.novelty_model()
        quantile = manifest.novelty.quantile if novelty_quantile is None else novelty_quantile
        self.novelty = self.novelty_model.calibration(quantile)
        kept = self.labels >= 0
        self.member_confidence = _group_means(
            self.labels[kept], found.member_confidence()[kept].astype(np.float64), len(self.names)
        )
        self.member_sizes = np.bincount(self.labels[kept], minlength=len(self.names))

    def _reference_setup(self, seed: int) -> None:
        """The members' reference rows as the clustering's own context tokens chose them (every member up to
        ``REFERENCE_MAX``, else the same random sample) and the same kind of index."""
        n = len(self.members)
        if n <= REFERENCE_MAX:
            self.reference_rows = np.arange(n)
            reference = normalize_rows(self.members.features())
            index_seed = 0  # cpp.knn.knn_indices's
        else:
            rng = np.random.default_rng(seed)
            self.reference_rows = np.sort(rng.choice(n, size=REFERENCE_MAX, replace=False))
            reference = normalize_rows(self.members.take(self.reference_rows))
            index_seed = seed
        self.reference = torch.from_numpy(reference)
        self.index = build_index(reference, exact_max=EXACT_MAX, seed=index_seed)

    def score(self, features: np.ndarray) -> _Scored:
        """Cluster, confidence, novelty score, member and novel flags of a block of raw features."""
        x = normalize_rows(features)
        similarity, nearest = self.index.search(x, self.k + 1)
        member = similarity[:, 0] >= MEMBER_SIMILARITY
        if self.fitted is not None:
            # A member's own row is not its own context (as when the clustering was fitted).
            neighbours = np.where(member[:, None], nearest[:, 1:], nearest[:, : self.k])
            neighbours = np.where(neighbours < 0, nearest[:, :1], neighbours)  # IVF padding
            z, _ = self.fitted.encode(np.arange(len(x)), x, _MemberContext(self.reference, neighbours))
        else:
            z = x
        energies = subspace_scores(torch.from_numpy(z), self.bases).numpy()
        scores = _current_scores(energies, self.mapping, len(self.names))
        best = scores.argmax(1)
        cluster = best.copy()
        own = self.labels[self.reference_rows[nearest[:, 0]]]
        cluster[member & (own >= 0)] = own[member & (own >= 0)]
        chosen = scores[np.arange(len(x)), cluster]
        others = scores.copy()
        others[np.arange(len(x)), cluster] = -np.inf
        runner_up = others.max(1) if scores.shape[1] > 1 else np.zeros(len(x), dtype=np.float32)
        confidence = np.clip(chosen - np.maximum(runner_up, 0.0), 0.0, 1.0)
        score = self.novelty_model.score(x)
        novel = np.where(member, own == OUTLIER, score < self.novelty.threshold)
        return _Scored(cluster, confidence, score, member, novel, scores.max(1))


def _members_store(found: Clustering) -> MemberStore:
    try:
        return found.member_store()
    except StoreError as exc:
        raise ClusteringError(
            f"the feature store of the clustering {found.path} is not usable: {exc}"
        ) from exc


def revision_map(rev0: np.ndarray, current: np.ndarray, k0: int, k1: int) -> np.ndarray:
    """For each revision-0 cluster, the cluster of the newest revision that holds most of its members
    (-1 when all of them are outliers now)."""
    kept = current >= 0
    counts = np.zeros((k0, max(k1, 1)), dtype=np.int64)
    np.add.at(counts, (rev0[kept], current[kept]), 1)
    mapping = counts.argmax(1)
    mapping[counts.sum(1) == 0] = -1
    return mapping


def _current_scores(energies: np.ndarray, mapping: np.ndarray, k1: int) -> np.ndarray:
    """``(B, k1)``: each current cluster's score, the highest energy among the revision-0 subspaces mapped
    onto it (-inf for a cluster none maps onto)."""
    scores = np.full((len(energies), k1), -np.inf, dtype=np.float32)
    for j, target in enumerate(mapping.tolist()):
        if target >= 0:
            np.maximum(scores[:, target], energies[:, j], out=scores[:, target])
    return scores


def _group_means(groups: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    sums = np.bincount(groups, weights=values, minlength=k)
    counts = np.bincount(groups, minlength=k)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _atomic_write_text(path: Path, text: str) -> None:
    partial = path.with_name(f"{path.name}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def _no_images(store: FeatureStore, source: SourceSpec) -> AssignError:
    skipped = store.skipped()
    if not skipped:
        return AssignError(f"{source.path} holds no images to assign")
    reasons = "; ".join(f"{s.path or s.key}: {s.reason}" for s in skipped[:3])
    more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
    return AssignError(
        f"none of the {len(skipped)} files of {source.path} is a usable image: {reasons}{more}"
    )


def assign(
    clustering: Clustering | str | Path,
    source: SourceSpec,
    work_dir: str | Path,
    *,
    options: AssignOptions | None = None,
    encoder: Encoder | None = None,
    engine: EmbedEngine | None = None,
    control: RunControl | None = None,
    roots: Roots = None,
) -> AssignSummary:
    """Assign the images of ``source`` to ``clustering`` (a :class:`Clustering` or a path that
    :func:`cpp.clustering.open` takes); writes the files of ``work_dir`` (see the module docstring) and
    returns the summary.

    ``encoder`` defaults to the clustering's own, built on ``options.device``; either way it must match the
    clustering's (:class:`AssignError` otherwise). Resumable: the feature store in ``work_dir/features`` is
    resumed or reused. Progress stages ``embed`` and ``assign``; :class:`~cpp.progress.Cancelled` between
    batches after ``control.cancel()``. With ``roots``, only files inside them are read.
    """
    # Over 60 lines: embedding, the streamed scoring generator and the drift summary share the per-cluster
    # counters that the generator fills while the output is written; split, they would be passed around.
    options = options or AssignOptions()
    control = control or RunControl()
    found = clustering if isinstance(clustering, Clustering) else clusterings.open(clustering)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    members_meta = _members_store(found).meta
    if encoder is None:
        encoder = clustering_encoder(found, options.device)
    else:
        check_encoder(found, encoder)
    store = embed_source(
        source,
        work_dir / FEATURES_DIR,
        encoder,
        batch_size=options.batch_size,
        engine=engine,
        chunk_size=int(members_meta.get("chunk_size", 4096)),
        dtype="float32" if members_meta.get("dtype") == "float32" else "float16",
        max_pixels=int(members_meta.get("settings", {}).get("max_pixels", 64_000_000)),
        control=control,
        roots=roots,
    )
    embedded = time.perf_counter()
    if len(store) == 0:
        raise _no_images(store, source)
    assigner = Assigner(found, device=options.device, novelty_quantile=options.novelty_quantile)
    k1 = len(assigner.names)
    counts = np.zeros(k1, dtype=np.int64)
    novel_counts = np.zeros(k1, dtype=np.int64)
    confidence_sums = np.zeros(k1, dtype=np.float64)
    totals = {"members": 0, "novel": 0}
    stage = control.stage("assign", len(store))

    def records() -> Iterator[dict[str, Any]]:
        rows = store.iter_rows()
        for _, block in store.iter_blocks():
            control.check_cancelled()
            scored = assigner.score(block)
            np.add.at(counts, scored.cluster, 1)
            np.add.at(novel_counts, scored.cluster, scored.novel.astype(np.int64))
            np.add.at(confidence_sums, scored.cluster, scored.confidence.astype(np.float64))
            totals["members"] += int(scored.member.sum())
            totals["novel"] += int(scored.novel.sum())
            for i in range(len(block)):
                row = next(rows)
                cluster = int(scored.cluster[i])
                yield NewImage(
                    key=row.key,
                    path=row.path,
                    cluster=cluster,
                    name=assigner.names[cluster],
                    confidence=round(float(scored.confidence[i]), 5),
                    novel=bool(scored.novel[i]),
                    score=round(float(scored.score[i]), 5),
                    member=bool(scored.member[i]),
                    true_label=row.label,
                ).model_dump()
            stage.advance(len(block))

    clusterings.write_assignments(work_dir, records(), len(store))
    finished = time.perf_counter()
    state = found.state()
    summary = AssignSummary(
        clustering={"id": found.id, "path": str(found.path.resolve()), "revision": assigner.revision},
        source=resolved_spec(source),
        items=store.counts["items"],
        embedded=len(store),
        skipped=[SkippedFile(key=s.key, path=s.path, reason=s.reason) for s in store.skipped()],
        members=totals["members"],
        novel=totals["novel"],
        novel_share=round(totals["novel"] / len(store), 5),
        novelty=assigner.novelty,
        clusters=[
            ClusterDrift(
                id=j,
                name=cluster.name,
                members=int(assigner.member_sizes[j]),
                member_confidence=_rounded(assigner.member_confidence[j]),
                assigned=int(counts[j]),
                novel=int(novel_counts[j]),
                confidence=_rounded(confidence_sums[j] / counts[j]) if counts[j] else None,
            )
            for j, cluster in enumerate(state.clusters)
        ],
        timings_s={
            "embed": round(embedded - started, 3),
            "assign": round(finished - embedded, 3),
            "total": round(finished - started, 3),
        },
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    _atomic_write_text(work_dir / SUMMARY_FILE, summary.model_dump_json(indent=1))
    return summary


def _rounded(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 5)


def load_summary(work_dir: str | Path) -> AssignSummary:
    """The summary an :func:`assign` run wrote in ``work_dir``."""
    path = Path(work_dir) / SUMMARY_FILE
    if not path.is_file():
        raise AssignError(f"{path} does not exist: the assignment has not finished")
    return AssignSummary.model_validate_json(path.read_text(encoding="utf-8"))


def read_results(work_dir: str | Path, *, offset: int = 0, limit: int = 100) -> tuple[list[bytes], int]:
    """One page of the JSON lines of an :func:`assign` run in ``work_dir`` (each ends with a newline) and
    the total count."""
    if offset < 0 or limit < 0:
        raise AssignError("offset and limit must be non-negative")
    work_dir = Path(work_dir)
    index = work_dir / RESULTS_INDEX
    if not index.is_file():
        raise AssignError(f"{work_dir} holds no finished assignment")
    offsets = np.load(index, mmap_mode="r")
    total = len(offsets) - 1
    stop = min(offset + limit, total)
    if offset >= stop:
        return [], total
    with (work_dir / RESULTS_FILE).open("rb") as handle:
        handle.seek(int(offsets[offset]))
        data = handle.read(int(offsets[stop]) - int(offsets[offset]))
    return data.splitlines(keepends=True), total


def iter_results(work_dir: str | Path) -> Iterator[NewImage]:
    """Every record of an :func:`assign` run in ``work_dir``, in source order."""
    with (Path(work_dir) / RESULTS_FILE).open("rb") as handle:
        for line in handle:
            yield NewImage.model_validate(json.loads(line))


class UpdateOutcome(BaseModel):
    """What :func:`update` added to a clustering."""

    revision: int | None = Field(description="The revision made (None: nothing was new).")
    added: int = Field(description="Images added as members.")
    filed: int = Field(description="Of those, images filed under a cluster.")
    novel: int = Field(description="Of those, images kept in the novel pool (in no cluster).")
    already_members: int = Field(description="Images skipped: the clustering already holds them.")


def update(clustering: Clustering | str | Path, work_dir: str | Path) -> UpdateOutcome:
    """Add the images of the :func:`assign` run in ``work_dir`` to ``clustering`` as a new revision, without
    refitting: each joins the cluster it was assigned to (sizes and representatives recounted), or the novel
    pool (:meth:`~cpp.clustering.Clustering.novel_pool`, outside every cluster) when it was novel; its
    features are copied into the clustering (``additions/<n>/``). The revision's edit is
    ``update`` with ``kind: assign-update`` and the counts.

    Images the clustering already holds are skipped: those the assignment found to be members (same
    features) and those whose key an earlier update added from the same source, so repeating an update adds
    nothing (and makes no revision). :class:`AssignError` when the clustering changed since the assignment
    (assign again) or the assignment was made for another clustering.
    """
    # Over 60 lines: every step after the checks runs under the edit lock, reading the clustering as it is
    # now, and the one write (Clustering.grow) comes last; the steps are kept together in that order.
    work_dir = Path(work_dir)
    summary = load_summary(work_dir)
    found = clustering if isinstance(clustering, Clustering) else clusterings.open(clustering)
    if summary.clustering.get("id") != found.id:
        raise AssignError(
            f"the assignment in {work_dir} was made for clustering {summary.clustering.get('id')}, "
            f"not {found.id}"
        )
    with curation.edit_lock(found):
        found = clusterings.open(found.path)  # the manifest as it is now, under the lock
        found.discard_uncommitted()
        if found.revision != summary.clustering.get("revision"):
            raise AssignError(
                f"the clustering {found.path} is at revision {found.revision}, the assignment in {work_dir} "
                f"was made against revision {summary.clustering.get('revision')}: assign again to update"
            )
        mem = curation.members(found)
        added_keys = {
            key
            for addition in found.manifest.additions
            if addition.source == summary.source
            for key in mem.keys[addition.start : addition.start + addition.rows]
        }
        records = list(iter_results(work_dir))
        fresh = [i for i, r in enumerate(records) if not r.member and r.key not in added_keys]
        skipped = len(records) - len(fresh)
        if not fresh:
            return UpdateOutcome(revision=None, added=0, filed=0, novel=0, already_members=skipped)
        chosen = [records[i] for i in fresh]
        labels = np.array([OUTLIER if r.novel else r.cluster for r in chosen], dtype=np.int64)
        confidence = np.array([r.confidence for r in chosen], dtype=np.float32)
        clusters = _grown_clusters(found, mem, chosen, labels)
        novel = int((labels == OUTLIER).sum())
        start = found.manifest.members
        edit_args = {
            "kind": "assign-update",
            "assignment": str(work_dir.resolve()),
            "source": summary.source,
            "added": len(chosen),
            "filed": len(chosen) - novel,
            "novel": novel,
            "already_members": skipped,
            "rows": [start, start + len(chosen)],
        }
        number = found.grow(
            work_dir / FEATURES_DIR,
            store_rows=np.asarray(fresh, dtype=np.int64),
            labels=labels,
            confidence=confidence,
            novel=labels == OUTLIER,
            assignments=[
                Assignment(
                    key=r.key,
                    path=r.path,
                    cluster=int(label),
                    confidence=r.confidence,
                    true_label=r.true_label,
                )
                for r, label in zip(chosen, labels.tolist(), strict=True)
            ],
            clusters=clusters,
            edit=Edit(op="update", args=edit_args),
            source=summary.source,
        )
    log.info("added %d images to %s as revision %d (%d novel)", len(chosen), found.path, number, novel)
    return UpdateOutcome(
        revision=number, added=len(chosen), filed=len(chosen) - novel, novel=novel, already_members=skipped
    )


def _grown_clusters(
    found: Clustering, mem: curation.Members, chosen: list[NewImage], labels: np.ndarray
) -> list[Cluster]:
    """The newest revision's clusters with the new images counted in: sizes, and representatives re-chosen
    among the current ones and the new images by confidence (as many as before, at least
    :data:`cpp.curation.REPRESENTATIVES`)."""
    clusters = [c.model_copy(deep=True) for c in found.state().clusters]
    current = found.labels()
    kept = current[current >= 0]
    sizes = np.bincount(kept, minlength=len(clusters)) + np.bincount(
        labels[labels >= 0], minlength=len(clusters)
    )
    candidates: dict[int, list[tuple[float, str]]] = {}
    for record, label in zip(chosen, labels.tolist(), strict=True):
        if label >= 0:
            candidates.setdefault(label, []).append((record.confidence, record.path or record.key))
    for cluster in clusters:
        cluster.size = int(sizes[cluster.id])
        new = candidates.get(cluster.id)
        if not new:
            continue
        old = [
            (float(mem.confidence[row]), shown)
            for shown in cluster.representatives
            if (row := mem.row_of(shown)) is not None
        ]
        want = max(curation.REPRESENTATIVES, len(cluster.representatives))
        ranked = sorted(old + new, key=lambda pair: -pair[0])  # stable: current ones first on ties
        cluster.representatives = [shown for _, shown in ranked[:want]]
    return clusters
