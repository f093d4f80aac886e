"""Whole-set readout of a fitted head: clusters, confidences, cluster subspaces, and the choice of K.

Up to ``max_spectral`` samples are clustered directly by spectral clustering of a sparse kNN graph on the
cluster codes C. Above that, a random landmark subset is clustered that way and every sample is then assigned
to its nearest cluster subspace (top-r basis of the landmarks' Z per cluster), streamed block by block from
memory or a feature store: memory is O(N) for the labels plus one block, never O(N·d) or O(N²).
``clusters="auto"`` picks K with the smallest coding length of Z over a candidate range.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
import scipy.linalg
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import eigsh

from cpp.errors import CppError
from cpp.features import FeatureInput, as_matrix
from cpp.head_model import FittedHead
from cpp.kmeans import kmeans_pp
from cpp.knn import knn_indices, normalize_rows
from cpp.logging import get_logger
from cpp.progress import RunControl
from cpp.rate import coding_length
from cpp.result import GraphRows, KSelection

log = get_logger("readout")

#: Largest automatic K (the option's own limit).
MAX_AUTO_K = 1000
#: Spectral coordinates the automatic-K sweep clusters in (the first K of them for K below it).
SWEEP_DIMS = 128
#: faiss k-means restarts per candidate K in the sweep (the chosen K is clustered again by k-means++).
SWEEP_RESTARTS = 3
# k-means++ restarts of the spectral step. Three, not the baseline's ten: on Tiny ImageNet 200's spectral
# coordinates ACC 0.340 against 0.339 (features) and 0.275 against 0.276 (head codes), means of seeds
# 0-2, and the same partition on CIFAR-10, in 3.1 s instead of 11.4 s at K = 200.
SPECTRAL_RESTARTS = 3
# Distortion ε² of the coding length used to choose K. Training's ε² (0.1) codes the learned Z at the fine
# scale at which rate reduction has spread every cluster over many directions; at that scale splitting a
# cluster always pays. Model selection codes at the scale of a whole unit-norm vector (measured on
# synthetic subspace mixtures and CIFAR-10, see docs/benchmarks/quality.md).
SELECTION_EPS2 = 1.0
#: Principal directions and rows of the encoder features on which partitions are compared by coding length.
CHOICE_DIMS = 64
CHOICE_MAX_ROWS = 20_000


class ReadoutError(CppError):
    """The readout cannot run with the given data or cluster count."""


@dataclass
class Readout:
    """Per sample: cluster and confidence; per cluster: centre, subspace basis and the members nearest the
    centre; and how K was chosen."""

    labels: np.ndarray  # (N,) int64 in 0..K-1
    confidence: np.ndarray  # (N,) float32 in [0, 1]
    centers: np.ndarray  # (K, z_dim) unit-norm
    bases: np.ndarray  # (K, z_dim, r) orthonormal columns (zero columns for clusters with < r members)
    k_selection: KSelection
    representatives: list[np.ndarray]  # per cluster, row indices of the members nearest its centre
    fit: np.ndarray  # (N,) float32 energy of each sample in its own cluster's subspace (1 = inside it)
    z: np.ndarray | None  # (N, z_dim) the subspace features, kept when every row was clustered in memory
    graph: GraphRows | None = None  # the kNN graph's rows, for spectral clustering of the features


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, spherical: bool = True, redo: int = 3) -> np.ndarray:
    """faiss k-means labels of the rows of ``x``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(
        x.shape[1], k, niter=50, nredo=redo, seed=seed, spherical=spherical, min_points_per_centroid=1
    )
    km.train(x)
    _, labels = km.index.search(x, 1)
    return labels[:, 0].astype(np.int64)


def kmeans_baseline(features: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """Spherical k-means labels of the raw (L2-normalised) features: the baseline a head must beat."""
    return kmeans(normalize_rows(features), k, seed=seed)


def spectral_embedding(codes: np.ndarray, dims: int, *, neighbours: int = 15) -> np.ndarray:
    """Top ``dims`` eigenvectors of the normalised affinity of a symmetric kNN graph weighted by |cos|.

    The weights are summed and normalised in float64 and the graph solved in float32 (ARPACK's
    single-precision Lanczos): on Tiny ImageNet 200's 10,000 features the 200 vectors span the float64
    subspace (smallest principal cosine 1.0000, eigenvalues within 3e-6) in 1.9 s instead of 5.6 s
    (docs/benchmarks/quality.md).
    """
    n = codes.shape[0]
    x = normalize_rows(codes)
    k = min(neighbours, n - 1)
    idx = knn_indices(x, k)
    weights = np.abs(np.einsum("nd,nkd->nk", x, x[idx])).astype(np.float64)
    graph = sp.csr_matrix((weights.ravel(), (np.repeat(np.arange(n), k), idx.ravel())), shape=(n, n))
    graph = graph.maximum(graph.T)
    degree = np.asarray(graph.sum(1)).ravel()
    scale = sp.diags(1.0 / np.sqrt(np.maximum(degree, 1e-12)))
    normalised = (scale @ graph @ scale).astype(np.float32)
    v0 = np.asarray(np.random.default_rng(0).standard_normal(n), dtype=np.float32)
    _, vectors = eigsh(normalised, k=min(dims, n - 2), which="LA", v0=v0)
    return np.ascontiguousarray(vectors[:, ::-1])  # descending eigenvalues


def spectral_labels(embedding: np.ndarray, k: int, seed: int, *, sweep: bool = False) -> np.ndarray:
    """k-means on the first ``k`` spectral coordinates, rows normalised (Ng–Jordan–Weiss).

    k-means++ with ``SPECTRAL_RESTARTS`` restarts, the lowest inertia kept (on Tiny ImageNet 200, ACC 0.336
    with 10 restarts and 0.340 with 3, against 0.324 for faiss k-means with 20 random starts;
    docs/benchmarks/quality.md). A ``sweep`` over candidate K uses faiss k-means with ``SWEEP_RESTARTS``
    random starts instead: it only ranks the candidates, and the chosen K is clustered again.
    """
    coordinates = normalize_rows(embedding[:, :k])
    if sweep:
        return kmeans(coordinates, k, seed=seed, spherical=False, redo=SWEEP_RESTARTS)
    return kmeans_pp(coordinates, k, seed=seed, restarts=SPECTRAL_RESTARTS).labels


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Dense labels 0..K-1 ordered by decreasing cluster size (empty clusters dropped)."""
    counts = np.bincount(labels)
    order = np.argsort(-counts, kind="stable")
    order = order[counts[order] > 0]
    mapping = np.empty(len(counts), dtype=np.int64)
    mapping[order] = np.arange(len(order))
    return mapping[labels]


def top_right_singular_vectors(m: np.ndarray, rank: int) -> np.ndarray:
    """``(d, r)`` float64: the top ``r = min(rank, n, d)`` right singular vectors of ``m`` ``(n, d)``,
    largest first, signs arbitrary.

    From the top eigenpairs of the smaller Gram matrix (a third of a full SVD's time for 1,000 × 1,280, a
    ninth for 10,000 × 1,280). With ``d ≤ n`` they are eigenvectors of ``mᵀm`` (orthonormal even where ``m``
    has no energy); with ``n < d`` they are mapped from ``m mᵀ``'s, and a direction whose singular value is
    below 1e-6 of the largest (float32 noise in the features) is left as a zero column.
    """
    m = m.astype(np.float64)
    n, d = m.shape
    r = min(rank, n, d)
    small = min(n, d)
    gram = m.T @ m if d <= n else m @ m.T
    values, vectors = scipy.linalg.eigh(gram, subset_by_index=[small - r, small - 1])
    values, vectors = values[::-1], vectors[:, ::-1]
    if d <= n:
        return np.ascontiguousarray(vectors)
    positive = values > values.max(initial=0.0) * 1e-12
    right = np.zeros((d, r))
    right[:, positive] = (m.T @ vectors[:, positive]) / np.sqrt(values[positive])
    return right


def cluster_bases(z: np.ndarray, labels: np.ndarray, k: int, rank: int) -> np.ndarray:
    """``(k, d, rank)``: top-``rank`` right singular vectors of each cluster's Z (zero-padded)."""
    d = z.shape[1]
    bases = np.zeros((k, d, rank), dtype=np.float32)
    for j in range(k):  # K small decompositions, K ≤ a few hundred
        members = z[labels == j]
        if len(members) == 0:
            continue
        vectors = top_right_singular_vectors(members, rank)
        bases[j, :, : vectors.shape[1]] = vectors
    return bases


def subspace_scores(z: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """``(n, K)`` energy ‖U_jᵀz‖² of each row in each cluster subspace (1 − squared residual for unit z)."""
    return torch.einsum("nd,kdr->nkr", z, bases).pow(2).sum(-1)


class _Assigner:
    """Streamed nearest-subspace assignment: labels, score margins (confidence), per-cluster Z sums and the
    ``count`` members of each cluster nearest a reference centre, accumulated block by block."""

    def __init__(self, n: int, bases: np.ndarray, reference_centers: np.ndarray, count: int) -> None:
        self.k, self.d = bases.shape[0], bases.shape[1]
        self.bases = torch.from_numpy(bases)
        self.reference = reference_centers
        self.count = count
        self.labels = np.empty(n, dtype=np.int64)
        self.margin = np.empty(n, dtype=np.float32)
        self.fit = np.empty(n, dtype=np.float32)
        self.sums = torch.zeros(self.k, self.d, dtype=torch.float64)
        self._best_rows = np.zeros(0, dtype=np.int64)
        self._best_labels = np.zeros(0, dtype=np.int64)
        self._best_close = np.zeros(0, dtype=np.float32)

    def add(self, start: int, z: np.ndarray) -> None:
        chunk = torch.from_numpy(z)
        top = subspace_scores(chunk, self.bases).topk(min(2, self.k), dim=1)
        labels = top.indices[:, 0].numpy()
        second = top.values[:, 1] if self.k > 1 else torch.zeros(len(chunk))
        self.labels[start : start + len(z)] = labels
        self.margin[start : start + len(z)] = (top.values[:, 0] - second).clamp(0, 1).numpy()
        self.fit[start : start + len(z)] = top.values[:, 0].numpy()
        self.sums.index_add_(0, top.indices[:, 0], chunk.double())
        if self.count == 0:
            return
        rows = np.concatenate([self._best_rows, np.arange(start, start + len(z))])
        labels = np.concatenate([self._best_labels, labels])
        closeness = np.concatenate(
            [self._best_close, np.einsum("nd,nd->n", z, self.reference[labels[-len(z) :]])]
        )
        kept = _nearest_per_cluster(labels, closeness, self.count)
        self._best_rows, self._best_labels, self._best_close = rows[kept], labels[kept], closeness[kept]

    def representatives(self) -> list[np.ndarray]:
        return [self._best_rows[self._best_labels == j] for j in range(self.k)]


def _nearest_per_cluster(labels: np.ndarray, closeness: np.ndarray, count: int) -> np.ndarray:
    """Positions of the ``count`` highest-``closeness`` entries per label, grouped by label, best first."""
    order = np.lexsort((-closeness, labels))
    sorted_labels = labels[order]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")
    return order[np.arange(len(order)) - first < count]


def _own_scores(z: np.ndarray, bases: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's energy in its own cluster's subspace, and that minus its best other cluster's, clipped to
    [0, 1] (the confidence)."""
    scores = subspace_scores(torch.from_numpy(z), torch.from_numpy(bases))
    own = scores.gather(1, torch.from_numpy(labels)[:, None])[:, 0]
    others = scores.scatter(1, torch.from_numpy(labels)[:, None], float("-inf"))
    best_other = others.max(1).values if scores.shape[1] > 1 else torch.zeros_like(own)
    margin = (own - best_other).clamp(0, 1).numpy().astype(np.float32)
    return own.numpy().astype(np.float32), margin


def candidate_ks(n: int) -> list[int]:
    """Automatic K candidates for ``n`` samples: every K up to 20, then a geometric grid (ratio 1.15) up to
    N/20 (at least min(50, N/10); at most ``MAX_AUTO_K``), so the range grows with the collection."""
    top = max(2, min(MAX_AUTO_K, max(n // 20, min(50, n // 10))))
    grid = set(range(2, min(top, 20) + 1))
    k = 20.0
    while (k := k * 1.15) < top:
        grid.add(round(k))
    grid.add(top)
    return sorted(grid)


def readout(
    fitted: FittedHead,
    features: FeatureInput,
    clusters: Literal["auto"] | int = "auto",
    *,
    seed: int = 0,
    control: RunControl | None = None,
    max_spectral: int = 20_000,
    rank: int | None = None,
    selection_eps2: float = SELECTION_EPS2,
    representatives: int = 5,
) -> Readout:
    """Cluster every row of ``features`` (an array or a feature store) with ``fitted``'s head.

    ``rank`` is the dimension of each cluster's subspace basis (default ``z_dim // K``, at least 1);
    ``selection_eps2`` the distortion of the coding length that chooses K; ``representatives`` the members
    listed per cluster (nearest its centre; above ``max_spectral`` rows, nearest the landmarks' centre).
    """
    # Over 60 lines: landmarks, the spectral sweep over K, the chosen partition and its subspaces, then the
    # in-memory or streamed assignment of every row; each step consumes the previous one's arrays.
    matrix = as_matrix(features)
    n = len(matrix)
    if clusters != "auto" and not (isinstance(clusters, int) and 2 <= clusters <= n):
        raise ReadoutError(
            f"clusters must be 'auto' or an integer in 2..{n} (the sample count), got {clusters!r}"
        )
    context = fitted.context(matrix)
    rng = np.random.default_rng(seed)
    landmarks = (
        np.arange(n) if n <= max_spectral else np.sort(rng.choice(n, size=max_spectral, replace=False))
    )
    n_land = len(landmarks)
    candidates = [clusters] if isinstance(clusters, int) else candidate_ks(n_land)
    if max(candidates) > n_land - 2:
        raise ReadoutError(
            f"{max(candidates)} clusters need more than {max(candidates) + 1} samples, got {n_land}"
        )
    z_land, c_land = fitted.encode(landmarks, matrix.take(landmarks), context)
    sweep = len(candidates) > 1
    embedding = spectral_embedding(c_land, min(max(candidates), SWEEP_DIMS) if sweep else candidates[0])
    z_land_t = torch.from_numpy(z_land)
    lengths: list[float] = []
    stage = control.stage("readout", (len(candidates) if sweep else 0) + 1) if control else None
    for k in candidates if sweep else []:
        labels_k = spectral_labels(embedding, k, seed, sweep=True)
        lengths.append(float(coding_length(z_land_t, torch.from_numpy(labels_k), selection_eps2)))
        if stage:
            stage.advance()
    chosen = candidates[int(np.argmin(lengths))] if sweep else candidates[0]
    if sweep:  # the chosen K again, in its own spectral coordinates
        embedding = spectral_embedding(c_land, chosen)
    land_labels = _relabel_by_size(spectral_labels(embedding, chosen, seed))
    if stage:
        stage.advance()
    k_final = int(land_labels.max()) + 1
    selection = KSelection(
        method="fixed" if isinstance(clusters, int) else "coding_length",
        k=k_final,
        candidates=[] if isinstance(clusters, int) else candidates,
        coding_length=[] if isinstance(clusters, int) else lengths,
    )
    if k_final != chosen:
        log.warning("k-means left %d of %d clusters empty", chosen - k_final, chosen)
    r = rank or max(1, z_land.shape[1] // k_final)
    bases = cluster_bases(z_land, land_labels, k_final, r)
    blocks = ((start, z) for start, z, _ in fitted.transform_blocks(matrix, context=context))
    return _finish(z_land, land_labels, bases, selection, n, blocks, representatives, control)


def feature_readout(
    features: FeatureInput,
    clusters: int,
    *,
    seed: int = 0,
    control: RunControl | None = None,
    max_spectral: int = 20_000,
    representatives: int = 5,
) -> Readout:
    """Spectral clustering of the kNN graph of the encoder features (rows from :func:`graph_rows`) into
    ``clusters`` (no head).

    Above ``max_spectral`` rows a random landmark subset is clustered and every row is then assigned to the
    nearest landmark-cluster subspace (rank ``min(8, d // K)``) of the unit features, streamed block by block.
    """
    matrix = as_matrix(features)
    n = len(matrix)
    rng = np.random.default_rng(seed)
    landmarks = (
        np.arange(n) if n <= max_spectral else np.sort(rng.choice(n, size=max_spectral, replace=False))
    )
    x_land = normalize_rows(matrix.take(landmarks).astype(np.float32))
    # Centres and bases stay in the unit features, the space new images are assigned in.
    rows, graph = graph_rows(x_land)
    labels = _relabel_by_size(spectral_labels(spectral_embedding(rows, clusters), clusters, seed))
    k = int(labels.max()) + 1
    bases = cluster_bases(x_land, labels, k, max(1, min(8, x_land.shape[1] // k)))
    selection = KSelection(method="fixed", k=k)
    blocks = ((start, normalize_rows(block.astype(np.float32))) for start, block in matrix.blocks())
    found = _finish(x_land, labels, bases, selection, n, blocks, representatives, control)
    found.graph = graph
    return found


def graph_rows(x: np.ndarray) -> tuple[np.ndarray, GraphRows]:
    """The rows whose kNN graph :func:`feature_readout` cuts, made from unit features ``x``, and how.

    Non-negative features (a CNN's pooled activations) first take element-wise square roots, which damps
    the few activations that dominate a row (the Hellinger kernel): 10-NN label purity up in every one of
    nine settings tried (CIFAR-10 and Tiny ImageNet, 1,000 to 10,000 images), spectral ACC up by 0.9-1.3
    points on the two 10,000-image sets (docs/benchmarks/quality.md). Then the shared mean direction is
    removed (purity 0.566 against 0.549 on CIFAR-10, 0.310 against 0.287 on Tiny ImageNet).
    """
    graph: GraphRows = "centred"
    if len(x) and (x >= 0).all():
        x, graph = normalize_rows(np.sqrt(x)), "sqrt-centred"
    return normalize_rows(x - x.mean(0)), graph


def _finish(
    z_land: np.ndarray,
    labels: np.ndarray,
    bases: np.ndarray,
    selection: KSelection,
    n: int,
    blocks: Iterator[tuple[int, np.ndarray]],
    representatives: int,
    control: RunControl | None,
) -> Readout:
    """The readout of a landmark partition: centres, representatives, fit and confidence of every row.

    When the landmarks are all ``n`` rows (``z_land`` their unit vectors in the readout space) everything is
    computed in memory and ``blocks`` is not read; otherwise every row, as ``(first_row, unit vectors)``
    from ``blocks``, is assigned to its nearest landmark-cluster subspace, streamed.
    """
    k = len(bases)
    sums = np.zeros((k, z_land.shape[1]))
    np.add.at(sums, labels, z_land.astype(np.float64))
    centers = normalize_rows(sums.astype(np.float32))
    if len(z_land) == n:
        closeness = np.einsum("nd,nd->n", z_land, centers[labels])
        nearest = _nearest_per_cluster(labels, closeness, representatives)
        fit, confidence = _own_scores(z_land, bases, labels)
        reps = [nearest[labels[nearest] == j] for j in range(k)]
        return Readout(labels, confidence, centers, bases, selection, reps, fit, z_land)
    assigner = _Assigner(n, bases, centers, representatives)
    stage = control.stage("assign", n) if control else None
    for start, block in blocks:
        assigner.add(start, block)
        if stage:
            stage.advance(len(block))
    return Readout(
        assigner.labels,
        assigner.margin,
        normalize_rows(assigner.sums.numpy().astype(np.float32)),
        bases,
        selection,
        assigner.representatives(),
        assigner.fit,
        None,
    )


def feature_coding_lengths(
    features: FeatureInput,
    partitions: Mapping[str, np.ndarray],
    *,
    dims: int = CHOICE_DIMS,
    eps2: float = SELECTION_EPS2,
    max_rows: int = CHOICE_MAX_ROWS,
    seed: int = 0,
) -> dict[str, float]:
    """Bits to code the encoder features given each partition (labels per row) of ``partitions``
    (``cpp.rate.coding_length``), by name.

    The features are coded where partitions of them differ: rows L2-normalised, projected on their top
    ``dims`` principal directions and normalised again; above ``max_rows`` rows on a fixed random sample.
    The sample and projection are computed once and serve every partition, so the lengths compare.
    """
    matrix = as_matrix(features)
    n = len(matrix)
    rows = np.arange(n) if n <= max_rows else np.sort(np.random.default_rng(seed).choice(n, max_rows, False))
    x = normalize_rows(matrix.take(rows).astype(np.float32)).astype(np.float64)
    x -= x.mean(0)
    projected = torch.from_numpy(normalize_rows((x @ top_right_singular_vectors(x, dims)).astype(np.float32)))
    return {
        name: float(coding_length(projected, torch.from_numpy(labels[rows]), eps2))
        for name, labels in partitions.items()
    }


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of a partition of unit rows under cosine distance (O(N²): small N only)."""
    distance = 1.0 - x @ x.T
    k = int(labels.max()) + 1
    onehot = np.eye(k, dtype=np.float64)[labels]
    sizes = onehot.sum(0)
    mean_to = (distance @ onehot) / np.maximum(sizes, 1)  # (N, K) mean distance to each cluster
    own = labels
    own_size = sizes[own]
    a = mean_to[np.arange(len(x)), own] * own_size / np.maximum(own_size - 1, 1)  # exclude the point itself
    others = mean_to.copy()
    others[np.arange(len(x)), own] = np.inf
    others[:, sizes == 0] = np.inf
    b = others.min(1)
    score = (b - a) / np.maximum(np.maximum(a, b), 1e-12)
    score[own_size <= 1] = 0.0
    return float(score.mean())


def direct_readout(
    features: np.ndarray, clusters: int | str, *, seed: int = 0, representatives: int = 5
) -> Readout:
    """Spherical k-means of the unit features (no head); K by silhouette when ``clusters='auto'``."""
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    n = len(x)
    if isinstance(clusters, int):
        candidates = [clusters]
    else:
        candidates = list(range(2, max(2, min(MAX_AUTO_K, n // 2)) + 1))
    partitions = [kmeans(x, k, seed=seed) for k in candidates]
    scores = [silhouette(x, p) for p in partitions]
    best = int(np.argmax(scores))
    labels = partitions[best]
    counts = np.bincount(labels)
    order = np.argsort(-counts, kind="stable")
    order = order[counts[order] > 0]
    mapping = np.empty(len(counts), dtype=np.int64)
    mapping[order] = np.arange(len(order))
    labels = mapping[labels]
    k = len(order)
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, labels, x.astype(np.float64))
    centers = (sums / np.linalg.norm(sums, axis=1, keepdims=True)).astype(np.float32)
    similarity = x @ centers.T
    own = similarity[np.arange(n), labels]
    similarity[np.arange(n), labels] = -np.inf
    second = similarity.max(1) if k > 1 else np.zeros(n, dtype=np.float32)
    selection = KSelection(
        method="fixed" if isinstance(clusters, int) else "silhouette",
        k=k,
        candidates=[] if isinstance(clusters, int) else candidates,
    )
    rank = max(1, min(8, x.shape[1] // k))
    nearest = _nearest_per_cluster(labels, own, representatives)
    x = x.astype(np.float32)
    bases = cluster_bases(x, labels, k, rank)
    return Readout(
        labels=labels,
        confidence=np.clip(own - second, 0, 1).astype(np.float32),
        centers=centers,
        bases=bases,
        k_selection=selection,
        representatives=[nearest[labels[nearest] == j] for j in range(k)],
        fit=_own_scores(x, bases, labels)[0],
        z=x,
    )
