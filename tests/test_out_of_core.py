"""Out-of-core paths: fit, readout and naming read a feature store block by block and give the results of the
in-memory array; context neighbours come from a reference sample above ``reference_max`` rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from synthetic import subspace_mixture, write_store

from cpp.features import FeatureMatrix
from cpp.head_model import ContextTokens, FitConfig, FittedHead
from cpp.heads import HeadConfig, TokenSets
from cpp.knn import normalize_rows
from cpp.metrics import clustering_accuracy
from cpp.naming import NamingConfig, NamingMethod, name_clusters
from cpp.readout import _nearest_per_cluster, readout
from cpp.store import FeatureStore
from cpp.train import fit_head
from cpp.vocab import Vocabulary


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, FeatureStore, FittedHead]:
    x, y = subspace_mixture(700, 24, 4, 2, seed=5)
    store = write_store(tmp_path_factory.mktemp("store") / "features", x, chunk_size=97)
    head = HeadConfig(width=32, layers=1, heads=4, z_dim=16, context_k=4)
    fit = FitConfig(epochs=6, batch_size=128, cluster_rows=32, max_train_samples=500, device="cpu")
    return x, y, store, fit_head(x, head, fit)


def test_store_blocks_and_take_match_the_array(
    data: tuple[np.ndarray, np.ndarray, FeatureStore, FittedHead],
) -> None:
    x, _, store, _ = data
    starts = [start for start, _ in store.iter_blocks()]
    assert starts == list(range(0, 700, 97))
    np.testing.assert_array_equal(np.concatenate([b for _, b in store.iter_blocks()]), x)
    rows = np.array([699, 3, 96, 97, 3, 500])
    np.testing.assert_array_equal(store.take(rows), x[rows])
    with pytest.raises(IndexError):
        store.take(np.array([700]))


def test_fit_on_a_store_equals_fit_on_the_array(
    data: tuple[np.ndarray, np.ndarray, FeatureStore, FittedHead],
) -> None:
    _, _, store, fitted = data
    from_store = fit_head(store, fitted.head_config, fitted.fit_config)  # samples 500 of 700 rows by index
    for a, b in zip(fitted.head.state_dict().values(), from_store.head.state_dict().values(), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_streamed_readout_of_a_store_equals_the_in_memory_one(
    data: tuple[np.ndarray, np.ndarray, FeatureStore, FittedHead],
) -> None:
    x, y, store, fitted = data
    in_memory = readout(fitted, x, 4, max_spectral=300, representatives=3)
    streamed = readout(fitted, store, 4, max_spectral=300, representatives=3)
    assert in_memory.z is None and streamed.z is None  # the landmark path keeps no N x d matrix
    np.testing.assert_array_equal(in_memory.labels, streamed.labels)
    np.testing.assert_allclose(in_memory.confidence, streamed.confidence, atol=1e-6)
    np.testing.assert_allclose(in_memory.centers, streamed.centers, atol=1e-6)
    for a, b in zip(in_memory.representatives, streamed.representatives, strict=True):
        np.testing.assert_array_equal(a, b)
    assert clustering_accuracy(y, streamed.labels) > 0.8


def test_streamed_representatives_are_members_of_their_cluster(
    data: tuple[np.ndarray, np.ndarray, FeatureStore, FittedHead],
) -> None:
    _, _, store, fitted = data
    out = readout(fitted, store, 4, max_spectral=300, representatives=3)
    for j, reps in enumerate(out.representatives):
        members = np.flatnonzero(out.labels == j)
        assert len(reps) == min(3, len(members)) and set(reps.tolist()) <= set(members.tolist())


def test_nearest_per_cluster_keeps_the_best_of_each_label() -> None:
    labels = np.array([1, 0, 1, 1, 0, 2])
    closeness = np.array([0.5, 0.1, 0.9, 0.7, 0.3, 0.2], dtype=np.float32)
    kept = _nearest_per_cluster(labels, closeness, 2)
    assert kept.tolist() == [4, 1, 2, 3, 5]


def test_context_from_a_reference_sample(
    data: tuple[np.ndarray, np.ndarray, FeatureStore, FittedHead],
) -> None:
    x, _, store, fitted = data
    context = ContextTokens(FeatureMatrix(store), 4, seed=0, reference_max=200)
    rows = np.arange(700)
    unit = normalize_rows(x)
    sets = context.tokens(rows, unit)
    assert isinstance(sets, TokenSets)  # context rows by reference
    tokens = sets.dense().numpy()
    assert tokens.shape == (700, 5, 24)
    np.testing.assert_array_equal(tokens[:, 0], unit)
    # Context rows come from the reference sample and never repeat the row itself.
    reference = {row.tobytes() for row in unit[context._rows]}
    assert all(t.tobytes() in reference for t in tokens[:, 1:].reshape(-1, 24))
    assert not np.any(np.all(tokens[:, 1:] == tokens[:, :1], axis=-1))
    z, _ = fitted.encode(rows, x, context)
    assert z.shape == (700, 16) and np.isfinite(z).all()


@pytest.mark.parametrize("method", ["centre", "vote", "subspace"])
def test_naming_a_store_equals_naming_the_array(
    data: tuple[np.ndarray, np.ndarray, FeatureStore, FittedHead], method: NamingMethod
) -> None:
    x, y, store, _ = data
    rng = np.random.default_rng(0)
    label_vectors = rng.standard_normal((12, 24)).astype(np.float32)
    vocabulary = Vocabulary(
        names=tuple(f"name{i}" for i in range(12)), origins=("test",) * 12, templated=(True,) * 12
    )
    config = NamingConfig(method=method)
    a = name_clusters(x, y, label_vectors, vocabulary, config)
    b = name_clusters(store, y, label_vectors, vocabulary, config)
    assert [c.name for c in a.clusters] == [c.name for c in b.clusters]
    np.testing.assert_allclose([c.score for c in a.clusters], [c.score for c in b.clusters], atol=1e-5)
    np.testing.assert_array_equal(a.image_labels, b.image_labels)


def test_store_path_of_the_pipeline_api_accepts_a_store_anywhere(tmp_path: Path) -> None:
    x, y = subspace_mixture(400, 16, 3, 2, seed=1)
    store = write_store(tmp_path / "s", x, chunk_size=64, dtype="float16")
    head = HeadConfig(width=32, layers=1, heads=4, z_dim=16, context_k=3)
    fitted = fit_head(store, head, FitConfig(epochs=6, batch_size=128, cluster_rows=32, device="cpu"))
    out = readout(fitted, store, 3)
    assert out.z is not None and out.z.shape == (400, 16)  # all rows clustered in memory: Z kept
    assert clustering_accuracy(y, out.labels) > 0.8
