"""k-means++ (cpp.kmeans): recovers separated clusters, repeatable, keeps every cluster, refuses bad K."""

from __future__ import annotations

import numpy as np
import pytest

from cpp.kmeans import kmeans_pp
from cpp.metrics import evaluate


def _blobs(k: int, per: int, dim: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim)) * 10
    y = np.repeat(np.arange(k), per)
    return (centres[y] + spread * rng.standard_normal((k * per, dim))).astype(np.float32), y


def test_recovers_separated_clusters_of_unequal_sizes() -> None:
    x, y = _blobs(9, 40, 8, 0.5)
    keep = np.concatenate([np.flatnonzero(y != 5), np.flatnonzero(y == 5)[:7]])  # one cluster of 7
    x, y = x[keep], y[keep]
    fit = kmeans_pp(x, 9, seed=0)
    assert evaluate(y, fit.labels)["acc"] == 1.0
    assert fit.centers.shape == (9, 8)
    assert fit.inertia == pytest.approx(float(((x - fit.centers[fit.labels]) ** 2).sum()), rel=1e-4)


def test_same_seed_same_partition_and_more_restarts_never_worse() -> None:
    x, _ = _blobs(20, 15, 4, 4.0, seed=1)  # overlapping: restarts matter
    first, again = kmeans_pp(x, 20, seed=3), kmeans_pp(x, 20, seed=3)
    np.testing.assert_array_equal(first.labels, again.labels)
    one = kmeans_pp(x, 20, seed=3, restarts=1)
    assert first.inertia <= one.inertia + 1e-3


def test_every_cluster_keeps_a_member_with_duplicated_points() -> None:
    x = np.repeat(np.eye(3, dtype=np.float32), [50, 50, 2], axis=0)
    fit = kmeans_pp(x, 3, seed=0)
    assert sorted(np.bincount(fit.labels, minlength=3).tolist()) == [2, 50, 50]


@pytest.mark.parametrize(("k", "restarts"), [(0, 10), (11, 10), (2, 0)])
def test_bad_arguments_are_refused(k: int, restarts: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        kmeans_pp(np.zeros((10, 2), dtype=np.float32), k, restarts=restarts)
