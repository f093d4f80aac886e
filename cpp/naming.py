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

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from cpp.fit import FittedHead
from cpp.progress import StageReporter
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


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32, copy=False)


@torch.no_grad()
def labels_through_head(fitted: FittedHead, label_vectors: np.ndarray) -> np.ndarray:
    """Z of each label embedding fed to the head as a one-token set (no context neighbours)."""
    tokens = torch.from_numpy(_normalise(label_vectors))[:, None, :].to(fitted.device)
    fitted.head.eval()
    z, _ = fitted.head(tokens)
    return z.float().cpu().numpy()


def binding_space(
    features: np.ndarray,
    label_vectors: np.ndarray,
    config: NamingConfig,
    *,
    fitted: FittedHead | None = None,
    z: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image rows and label rows, unit-norm, in the configured space (``z``: the head's Z of ``features``)."""
    if config.space == "raw":
        images, names = features.astype(np.float32, copy=False), label_vectors
    else:
        if fitted is None:
            raise ValueError("naming in the head space needs the fitted head")
        images = z if z is not None else fitted.transform(features)[0]
        names = labels_through_head(fitted, label_vectors)
    if config.centre_features:
        images = images - images.mean(axis=0, dtype=np.float64).astype(np.float32)
    return _normalise(images), _normalise(names)


def _top_names(images: np.ndarray, names: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the indices and cosines of its ``k`` best names, best first (chunked over images)."""
    n = images.shape[0]
    k = min(k, names.shape[0])
    index = np.empty((n, k), dtype=np.int64)
    score = np.empty((n, k), dtype=np.float32)
    name_t = torch.from_numpy(names)
    for start in range(0, n, _CHUNK):
        sims = torch.from_numpy(images[start : start + _CHUNK]) @ name_t.T
        top = sims.topk(k, dim=1)
        index[start : start + len(sims)] = top.indices.numpy()
        score[start : start + len(sims)] = top.values.numpy()
    return index, score


def _cluster_scores(
    images: np.ndarray, names: np.ndarray, labels: np.ndarray, k: int, config: NamingConfig, top: np.ndarray
) -> np.ndarray:
    """``(k, V)`` score of every name for every cluster under ``config.method``."""
    sizes = np.bincount(labels, minlength=k).astype(np.float64)
    if config.method == "vote":
        votes = np.zeros((k, names.shape[0]), dtype=np.float64)
        np.add.at(votes, (np.repeat(labels, top.shape[1]), top.ravel()), 1.0)
        return (votes / np.maximum(sizes, 1)[:, None]).astype(np.float32)
    if config.method == "centre":
        sums = np.zeros((k, images.shape[1]), dtype=np.float64)
        np.add.at(sums, labels, images)
        return _normalise(sums.astype(np.float32)) @ names.T
    rng = np.random.default_rng(config.seed)
    scores = np.zeros((k, names.shape[0]), dtype=np.float32)
    for j in range(k):  # K small SVDs on at most _MAX_SVD_ROWS members each
        members = np.flatnonzero(labels == j)
        if len(members) == 0:
            continue
        if len(members) > _MAX_SVD_ROWS:
            members = rng.choice(members, size=_MAX_SVD_ROWS, replace=False)
        _, _, vt = np.linalg.svd(images[members].astype(np.float64), full_matrices=False)
        basis = vt[: config.rank].astype(np.float32)
        scores[j] = np.linalg.norm(names @ basis.T, axis=1)
    return scores


def name_clusters(
    features: np.ndarray,
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

    ``label_vectors`` are the vocabulary's embeddings (:func:`cpp.labels.embed_vocabulary`); ``fitted`` and
    ``z`` are needed for the ``head`` space. ``stage`` (optional) is advanced twice.
    """
    config = config or NamingConfig()
    if label_vectors.shape[0] != len(vocabulary):
        raise ValueError(f"{label_vectors.shape[0]} label vectors for {len(vocabulary)} names")
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {labels.shape[0]} cluster labels")
    images, names = binding_space(features, label_vectors, config, fitted=fitted, z=z)
    k = int(labels.max()) + 1 if len(labels) else 0
    top, top_scores = _top_names(images, names, max(config.vote_k, 1))
    if stage:
        stage.advance()
    scores = _cluster_scores(images, names, labels, k, config, top)
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, : config.alternatives + 1]
    clusters: list[ClusterName] = []
    for j in range(k):
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
    if stage:
        stage.advance()
    return Naming(clusters, top[:, 0].copy(), top_scores[:, 0].copy())
