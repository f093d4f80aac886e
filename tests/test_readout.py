"""Readout: spectral and landmark paths, auto-K by coding length, confidence, and the k-means baseline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from synthetic import subspace_mixture

from cpp.errors import CppError
from cpp.head_model import FitConfig, FittedHead
from cpp.heads import HeadConfig
from cpp.knn import knn_indices
from cpp.metrics import clustering_accuracy
from cpp.readout import (
    candidate_ks,
    direct_readout,
    feature_coding_lengths,
    feature_readout,
    graph_rows,
    kmeans_baseline,
    readout,
    silhouette,
    spectral_embedding,
    spectral_labels,
    top_right_singular_vectors,
)
from cpp.train import fit_head


@pytest.fixture(scope="module")
def fitted_data() -> tuple[FittedHead, np.ndarray, np.ndarray]:
    x, y = subspace_mixture(600, 24, 4, 2, seed=3)
    head = HeadConfig(width=32, layers=1, heads=4, z_dim=16, context_k=5)
    fit = FitConfig(epochs=8, batch_size=128, cluster_rows=32, device="cpu")
    return fit_head(x, head, fit), x, y


def test_fixed_k_readout_shapes_and_ranges(fitted_data: tuple[FittedHead, np.ndarray, np.ndarray]) -> None:
    fitted, x, y = fitted_data
    out = readout(fitted, x, 4)
    assert out.labels.shape == (600,) and out.labels.dtype == np.int64
    assert set(np.unique(out.labels)) <= set(range(4))
    assert out.confidence.dtype == np.float32
    assert (out.confidence >= 0).all() and (out.confidence <= 1).all()
    assert out.centers.shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(out.centers, axis=1), 1, atol=1e-5)
    assert out.bases.shape == (4, 16, 4)
    assert out.k_selection.method == "fixed" and out.k_selection.k == 4
    assert out.z is not None and out.z.shape == (600, 16)
    assert clustering_accuracy(y, out.labels) > 0.8


def test_auto_k_keeps_the_curve_and_finds_the_mixture(
    fitted_data: tuple[FittedHead, np.ndarray, np.ndarray],
) -> None:
    fitted, x, _ = fitted_data
    out = readout(fitted, x, "auto")
    sel = out.k_selection
    assert sel.method == "coding_length"
    assert sel.candidates == candidate_ks(600)
    assert len(sel.coding_length) == len(sel.candidates)
    assert sel.k == sel.candidates[int(np.argmin(sel.coding_length))]
    assert 3 <= sel.k <= 5


def test_landmark_path_matches_spectral_path(fitted_data: tuple[FittedHead, np.ndarray, np.ndarray]) -> None:
    fitted, x, y = fitted_data
    out = readout(fitted, x, 4, max_spectral=300)
    assert out.labels.shape == (600,)
    assert clustering_accuracy(y, out.labels) > 0.8


def test_bad_cluster_count_is_a_user_error(fitted_data: tuple[FittedHead, np.ndarray, np.ndarray]) -> None:
    fitted, x, _ = fitted_data
    with pytest.raises(CppError, match="clusters must be"):
        readout(fitted, x, 1)


def test_kmeans_baseline_separates_clear_clusters() -> None:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 16)) * 5
    y = rng.integers(0, 3, 300)
    x = (centers[y] + rng.standard_normal((300, 16))).astype(np.float32)
    assert clustering_accuracy(y, kmeans_baseline(x, 3)) > 0.95


def test_knn_excludes_self_and_finds_neighbours() -> None:
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    idx = knn_indices(x, 1)
    np.testing.assert_array_equal(idx[:, 0], [1, 0, 3, 2])
    approx = knn_indices(np.repeat(x, 30, axis=0) + 0.01 * np.arange(120)[:, None], 3, exact_max=50)
    assert approx.shape == (120, 3)
    assert not (approx == np.arange(120)[:, None]).any()


def test_silhouette_matches_the_definition() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 5)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, 3, size=30)
    labels[:2] = [0, 1]
    labels[2] = 2
    distance = 1.0 - x.astype(np.float64) @ x.T.astype(np.float64)
    expected = []
    for i in range(30):
        same = (labels == labels[i]) & (np.arange(30) != i)
        if not same.any():
            expected.append(0.0)
            continue
        a = distance[i, same].mean()
        b = min(distance[i, labels == j].mean() for j in set(labels.tolist()) - {labels[i]})
        expected.append((b - a) / max(a, b))
    assert silhouette(x, labels) == pytest.approx(float(np.mean(expected)), abs=1e-5)


def test_direct_readout_separates_planted_clusters() -> None:
    rng = np.random.default_rng(1)
    centres = np.eye(16, dtype=np.float32)[:4]
    x = np.repeat(centres, 10, axis=0) + 0.05 * rng.standard_normal((40, 16)).astype(np.float32)
    found = direct_readout(x, "auto")
    assert found.k_selection.method == "silhouette" and found.k_selection.k == 4
    assert found.k_selection.candidates == list(range(2, 21))
    assert len(set(zip(found.labels.tolist(), np.repeat(np.arange(4), 10).tolist(), strict=True))) == 4
    assert found.bases.shape[:2] == (4, 16) and (found.confidence > 0.5).all()


def test_candidate_range_grows_with_the_collection() -> None:
    assert candidate_ks(6) == [2]
    assert candidate_ks(600) == [*range(2, 21), 23, 26, 30, 35, 40, 46, 50]  # min(50, N/10)
    large = candidate_ks(10_000)
    assert large[:19] == list(range(2, 21)) and large[-1] == 500  # N/20
    assert all(b / a <= 1.2 for a, b in itertools.pairwise(large[18:]))  # ratio 1.15, rounded
    assert candidate_ks(10**7)[-1] == 1000


def test_feature_readout_separates_subspaces_where_kmeans_fails() -> None:
    x, y = subspace_mixture(900, 24, 6, 2, seed=5)  # planes through (almost) the origin: no centre to find
    found = feature_readout(x, 6)
    baseline = clustering_accuracy(y, kmeans_baseline(x, 6))
    assert clustering_accuracy(y, found.labels) > max(0.9, baseline + 0.2)
    assert found.k_selection.method == "fixed" and found.centers.shape == (6, 24)
    assert found.fit.shape == found.confidence.shape == (900,)
    landmarks = feature_readout(x, 6, max_spectral=400)
    assert clustering_accuracy(y, landmarks.labels) > 0.85
    assert found.graph == landmarks.graph == "centred"  # signed features: no square roots


def test_feature_coding_length_prefers_the_true_partition() -> None:
    x, y = subspace_mixture(900, 24, 6, 2, seed=5)
    shuffled = np.random.default_rng(0).permutation(y)
    bits = feature_coding_lengths(x, {"true": y, "kmeans": kmeans_baseline(x, 6), "shuffled": shuffled})
    assert bits["true"] < bits["kmeans"] < bits["shuffled"]


@pytest.mark.parametrize(("n", "d"), [(60, 20), (20, 60), (3, 60)])
def test_top_right_singular_vectors_span_the_svd_directions(n: int, d: int) -> None:
    m = np.random.default_rng(n).standard_normal((n, d))
    vectors = top_right_singular_vectors(m, 8)
    _, _, vt = np.linalg.svd(m, full_matrices=False)
    r = min(8, n, d)
    assert vectors.shape == (d, r)
    np.testing.assert_allclose(np.abs(np.sum(vectors * vt[:r].T, axis=0)), 1.0, atol=1e-9)


def test_top_right_singular_vectors_leave_missing_directions_zero() -> None:
    m = np.zeros((4, 10))
    m[:, 2] = 1.0  # rank one, fewer rows than columns
    vectors = top_right_singular_vectors(m, 3)
    np.testing.assert_allclose(np.abs(vectors[:, 0]), np.eye(10)[2])
    assert not vectors[:, 1:].any()


def test_spectral_embedding_spans_the_float64_eigenvectors() -> None:
    x, _ = subspace_mixture(400, 16, 5, 2, seed=4)
    embedding = spectral_embedding(x, 8)
    assert embedding.shape == (400, 8) and embedding.dtype == np.float32
    # The reference: the same graph written out densely and solved in float64.
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    idx = knn_indices(u.astype(np.float32), 15)
    graph = np.zeros((400, 400))
    graph[np.repeat(np.arange(400), 15), idx.ravel()] = np.abs(np.einsum("nd,nkd->nk", u, u[idx])).ravel()
    graph = np.maximum(graph, graph.T)
    scale = 1 / np.sqrt(graph.sum(1))
    _, vectors = np.linalg.eigh(scale[:, None] * graph * scale[None, :])
    reference = vectors[:, ::-1][:, :8]
    cosines = np.linalg.svd(reference.T @ embedding.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(cosines, 1.0, atol=1e-4)


def _bursty_clusters(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative rows: three classes of many small activations, each row also one large activation on a
    random one of 16 other dimensions (which raw cosine similarity follows instead of the class)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n // 3)
    x = rng.uniform(0.0, 0.02, size=(len(y), 64))
    for c in range(3):
        x[y == c, 16 * c : 16 * (c + 1)] += rng.uniform(0.05, 0.15, size=((y == c).sum(), 16))
    x[np.arange(len(y)), 48 + rng.integers(0, 16, len(y))] += 1.0
    return x.astype(np.float32), y


def test_graph_rows_take_square_roots_of_non_negative_features_only() -> None:
    x, y = _bursty_clusters(600, seed=5)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    rows, graph = graph_rows(unit)
    assert graph == "sqrt-centred"
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    _, signed = graph_rows(unit - unit.mean(0))
    assert signed == "centred"
    # The raw graph joins rows by their large activation; the square roots join them by class.
    raw = spectral_labels(spectral_embedding(unit - unit.mean(0), 3), 3, 0)
    assert clustering_accuracy(y, raw) < 0.6
    found = feature_readout(x, 3)
    assert found.graph == "sqrt-centred"
    assert clustering_accuracy(y, found.labels) > 0.95
