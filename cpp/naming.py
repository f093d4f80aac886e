"""Naming: bind each cluster, and each image, to the best names of a vocabulary.

Binding happens in one of two spaces:

- ``raw``: the encoder's feature space, where label embeddings live already;
- ``head``: the trained head's Z space; each label embedding goes through the head as a single token.

and by one of three methods:

- ``centre``: cosine of each name with the cluster's mean direction;
- ``subspace``: norm of each (unit) name vector projected onto the cluster's top principal directions;
- ``vote``: each member image votes for its ``vote_k`` best names (the CPP paper's rule); score = share of
  members voting for the name.

With ``centre_features`` the collection's mean feature is subtracted first (then rows are re-normalised): it
removes the direction all images share, which otherwise binds every cluster to the same few "hub" names.
The defaults are the best combination on ``scripts/bench_naming.py`` (see docs/benchmarks/naming.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from cpp.features import FeatureInput, FeatureMatrix, as_matrix
from cpp.head_model import FittedHead
from cpp.knn import normalize_rows
from cpp.progress import StageReporter
from cpp.readout import top_right_singular_vectors
from cpp.vocab import Vocabulary

NamingSpace = Literal["raw", "head"]
NamingMethod = Literal["centre", "subspace", "vote"]

_CHUNK = 8192
_MAX_SVD_ROWS = 4096


class NamingConfig(BaseModel):
    """How names are bound to clusters and images."""

    model_config = ConfigDict(extra="forbid")

    space: NamingSpace = "raw"
    method: NamingMethod = "centre"
    centre_features: bool = Field(default=True, description="subtract the collection's mean feature first")
    alternatives: int = Field(default=5, ge=0, description="runner-up names listed per cluster")
    vote_k: int = Field(default=5, ge=1, description="names each image votes for (method 'vote')")
    rank: int = Field(default=8, ge=1, description="subspace dimension per cluster (method 'subspace')")
    uncertain_margin: float = Field(
        default=0.05, ge=0, description="a cluster is uncertain when (best − runner-up) / best is below this"
    )
    seed: int = 0


@dataclass(frozen=True)
class ClusterName:
    """The name bound to one cluster."""

    name: str
    score: float
    uncertain: bool
    alternatives: list[tuple[str, float]]


@dataclass(frozen=True)
class Naming:
    """Cluster names, and every image's own best name (index into the vocabulary) with its cosine score."""

    clusters: list[ClusterName]
    image_labels: np.ndarray  # (N,) int64
    image_scores: np.ndarray  # (N,) float32


@torch.no_grad()
def labels_through_head(fitted: FittedHead, label_vectors: np.ndarray) -> np.ndarray:
    """Z of each label embedding fed to the head as a one-token set (no context neighbours)."""
    tokens = torch.from_numpy(normalize_rows(label_vectors))[:, None, :].to(fitted.device)
    fitted.head.eval()
    z, _ = fitted.head(tokens)
    return z.float().cpu().numpy()


def _space_blocks(
    matrix: FeatureMatrix, space: NamingSpace, fitted: FittedHead | None, z: np.ndarray | None
) -> Iterator[tuple[int, np.ndarray]]:
    """``(first_row, block)`` of the image rows in the binding space, streamed."""
    if space == "raw":
        yield from matrix.blocks()
    elif z is not None:
        for start in range(0, len(z), _CHUNK):
            yield start, z[start : start + _CHUNK]
    else:
        if fitted is None:
            raise ValueError("naming in the head space needs the fitted head")
        for start, z_block, _ in fitted.transform_blocks(matrix):
            yield start, z_block


def _mean_row(blocks: Iterator[tuple[int, np.ndarray]], dim: int) -> np.ndarray:
    total = np.zeros(dim, dtype=np.float64)
    count = 0
    for _, block in blocks:
        total += block.sum(axis=0, dtype=np.float64)
        count += len(block)
    return (total / max(count, 1)).astype(np.float32)


def _subspace_samples(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Sorted row indices: up to ``_MAX_SVD_ROWS`` random members of every cluster."""
    rng = np.random.default_rng(seed)
    picked = []
    for j in range(k):
        members = np.flatnonzero(labels == j)
        if len(members) > _MAX_SVD_ROWS:
            members = rng.choice(members, size=_MAX_SVD_ROWS, replace=False)
        picked.append(members)
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _subspace_scores(
    samples: np.ndarray, sample_labels: np.ndarray, names: np.ndarray, k: int, rank: int
) -> np.ndarray:
    """``(k, V)`` norm of each unit name projected on each cluster's top-``rank`` principal directions."""
    scores = np.zeros((k, names.shape[0]), dtype=np.float32)
    for j in range(k):  # K small decompositions of at most _MAX_SVD_ROWS members each
        members = samples[sample_labels == j]
        if len(members) == 0:
            continue
        directions = top_right_singular_vectors(members, rank).astype(np.float32)
        scores[j] = np.linalg.norm(names @ directions, axis=1)
    return scores


def name_clusters(
    features: FeatureInput,
    labels: np.ndarray,
    label_vectors: np.ndarray,
    vocabulary: Vocabulary,
    config: NamingConfig | None = None,
    *,
    fitted: FittedHead | None = None,
    z: np.ndarray | None = None,
    stage: StageReporter | None = None,
) -> Naming:
    """Name the clusters ``labels`` (``(N,)`` in 0..K-1) of ``features`` from ``vocabulary``.

    ``features`` is an array or a feature store, read in blocks (two passes when centring). ``label_vectors``
    are the vocabulary's embeddings (:func:`cpp.labels.embed_vocabulary`); ``fitted`` (and optionally ``z``,
    the head's Z of ``features``) are needed for the ``head`` space. ``stage`` (optional) is advanced twice.
    """
    config = config or NamingConfig()
    matrix = as_matrix(features)
    if label_vectors.shape[0] != len(vocabulary):
        raise ValueError(f"{label_vectors.shape[0]} label vectors for {len(vocabulary)} names")
    if len(matrix) != labels.shape[0]:
        raise ValueError(f"{len(matrix)} feature rows but {labels.shape[0]} cluster labels")
    names = _name_vectors(label_vectors, config, fitted)
    k = int(labels.max()) + 1 if len(labels) else 0
    votes = _Votes(config, labels, k, names)
    mean = (
        _mean_row(_space_blocks(matrix, config.space, fitted, z), names.shape[1])
        if config.centre_features
        else np.zeros(names.shape[1], dtype=np.float32)
    )
    for start, block in _space_blocks(matrix, config.space, fitted, z):
        votes.add(start, normalize_rows(block - mean))
    if stage:
        stage.advance()
    clusters = _cluster_names(votes.scores(), vocabulary, config)
    if stage:
        stage.advance()
    return Naming(clusters, votes.image_labels, votes.image_scores)


def _name_vectors(label_vectors: np.ndarray, config: NamingConfig, fitted: FittedHead | None) -> np.ndarray:
    """The unit name vectors in the naming space (through the head for ``head``)."""
    if config.space != "head":
        return normalize_rows(label_vectors)
    if fitted is None:
        raise ValueError("naming in the head space needs the fitted head")
    return normalize_rows(labels_through_head(fitted, label_vectors))


class _Votes:
    """What one streaming pass over the unit image vectors collects: every image's best name and score, and
    per cluster what its ``config.method`` scores the names from."""

    def __init__(self, config: NamingConfig, labels: np.ndarray, k: int, names: np.ndarray) -> None:
        self.config, self.labels, self.k, self.names = config, labels, k, names
        self.vote_k = min(max(config.vote_k, 1), names.shape[0])
        self.image_labels = np.empty(len(labels), dtype=np.int64)
        self.image_scores = np.empty(len(labels), dtype=np.float32)
        width = names.shape[1] if config.method == "centre" else names.shape[0]
        self.totals = np.zeros((k, width), dtype=np.float64)
        self.sampled = _subspace_samples(labels, k, config.seed) if config.method == "subspace" else None
        self.samples: list[np.ndarray] = []
        self._names_t = torch.from_numpy(names)

    def add(self, start: int, images: np.ndarray) -> None:
        """Count the unit image vectors of rows ``start ..``."""
        stop = start + len(images)
        block_labels = self.labels[start:stop]
        top = (torch.from_numpy(images) @ self._names_t.T).topk(self.vote_k, dim=1)
        self.image_labels[start:stop] = top.indices[:, 0].numpy()
        self.image_scores[start:stop] = top.values[:, 0].numpy()
        if self.config.method == "centre":
            np.add.at(self.totals, block_labels, images)
        elif self.config.method == "vote":
            np.add.at(self.totals, (np.repeat(block_labels, self.vote_k), top.indices.numpy().ravel()), 1.0)
        else:
            assert self.sampled is not None
            inside = self.sampled[(self.sampled >= start) & (self.sampled < stop)]
            self.samples.append(images[inside - start])

    def scores(self) -> np.ndarray:
        """``(K, names)`` score of every name for every cluster."""
        if self.config.method == "centre":
            return normalize_rows(self.totals.astype(np.float32)) @ self.names.T
        if self.config.method == "vote":
            sizes = np.bincount(self.labels, minlength=self.k).astype(np.float64)
            return (self.totals / np.maximum(sizes, 1)[:, None]).astype(np.float32)
        assert self.sampled is not None
        dim = self.names.shape[1]
        stacked = np.concatenate(self.samples) if self.samples else np.zeros((0, dim), dtype=np.float32)
        return _subspace_scores(stacked, self.labels[self.sampled], self.names, self.k, self.config.rank)


def _cluster_names(scores: np.ndarray, vocabulary: Vocabulary, config: NamingConfig) -> list[ClusterName]:
    """Each cluster's best name, its runners-up, and whether the best won by less than the margin."""
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, : config.alternatives + 1]
    clusters: list[ClusterName] = []
    for j in range(len(scores)):
        best = scores[j, ranked[j]]
        margin = (best[0] - best[1]) / max(abs(float(best[0])), 1e-12) if len(best) > 1 else 1.0
        clusters.append(
            ClusterName(
                name=vocabulary.names[ranked[j, 0]],
                score=float(best[0]),
                uncertain=bool(margin < config.uncertain_margin),
                alternatives=[
                    (vocabulary.names[i], float(s)) for i, s in zip(ranked[j, 1:], best[1:], strict=True)
                ],
            )
        )
    return clusters
