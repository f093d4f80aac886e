"""Curation: every edit is a new revision with recomputed sizes and representatives; bad edits are refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from clusterings import make_clustering

from cpp import clustering, curation
from cpp.clustering import OUTLIER, Clustering
from cpp.curation import CurationError, RevisionConflict


@pytest.fixture
def cl(tmp_path: Path) -> Clustering:
    return make_clustering(tmp_path, k=4, per=12, images=False)


def _consistent(cl: Clustering) -> None:
    """Sizes match the labels, ids are 0..K-1 and every representative is a member of its cluster."""
    labels = cl.labels()
    mem = curation.members(cl)
    state = cl.state()
    assert [c.id for c in state.clusters] == list(range(len(state.clusters)))
    sizes = np.bincount(labels[labels >= 0], minlength=len(state.clusters))
    assert [c.size for c in state.clusters] == sizes.tolist()
    for c in state.clusters:
        assert c.representatives
        assert all(labels[mem.row_of(r)] == c.id for r in c.representatives)
    result = cl.result()
    assert result.revision == cl.revision
    assert [a.cluster for a in result.assignments or []] == labels.tolist()


def test_rename_free_text_and_alternative(cl: Clustering) -> None:
    out = curation.rename(cl, 1, "  red   apples ")
    assert out.revision == 1 and cl.state().clusters[1].name == "red apples"
    alternative = cl.state().clusters[2].alternatives[0]
    curation.rename(cl, 2, alternative.name)
    renamed = cl.state().clusters[2]
    assert renamed.name == alternative.name and renamed.score == alternative.score
    assert renamed.alternatives[0].name == "cluster 2" and not renamed.uncertain
    assert [e.op for e in cl.edits()] == ["rename", "rename"]
    assert cl.edits()[1].args["source"] == "alternative"
    _consistent(cl)


def test_merge_renumbers_and_keeps_representatives(cl: Clustering) -> None:
    before = cl.state().clusters
    out = curation.merge(cl, [3, 1], name="merged")
    state = cl.state()
    assert len(state.clusters) == 3 and out.clusters == [2]  # into 3, renumbered after 1 went
    merged = state.clusters[2]
    assert merged.name == "merged" and merged.size == before[1].size + before[3].size
    assert set(merged.representatives) & set(before[3].representatives)
    assert set(merged.representatives) & set(before[1].representatives)
    _consistent(cl)


def test_move_and_outliers_drop_emptied_clusters(cl: Clustering) -> None:
    labels = cl.labels()
    zero = np.flatnonzero(labels == 0)
    curation.move(cl, zero[:5].tolist(), 2)
    assert cl.state().clusters[2].size == 17 and cl.state().clusters[0].size == 7
    _consistent(cl)
    curation.mark_outliers(cl, np.flatnonzero(cl.labels() == 0).tolist())
    state = cl.state()
    assert len(state.clusters) == 3 and int((cl.labels() == OUTLIER).sum()) == 7
    _consistent(cl)
    curation.move(cl, np.flatnonzero(cl.labels() == OUTLIER)[:2].tolist(), 0)  # outliers back in
    assert int((cl.labels() == OUTLIER).sum()) == 5
    _consistent(cl)


def test_split_recovers_two_merged_clusters(cl: Clustering) -> None:
    truth = cl.labels()
    curation.merge(cl, [0, 1])
    out = curation.split(cl, 0, 2)
    labels = cl.labels()
    assert out.clusters == [0, 3] and len(cl.state().clusters) == 4
    pieces = labels[truth <= 1]
    # the split parts are the two original clusters (in some order)
    assert {tuple(np.unique(pieces[truth[truth <= 1] == t])) for t in (0, 1)} == {(0,), (3,)}
    assert all(c.uncertain for c in cl.state().clusters if c.id in (0, 3))
    assert cl.edits()[-1].op == "split" and cl.edits()[-1].args["parts"] == 2
    _consistent(cl)


def test_split_of_a_large_cluster_recovers_its_parts_spectrally(tmp_path: Path) -> None:
    cl = make_clustering(tmp_path, k=4, per=20, images=False)
    truth = cl.labels()
    curation.merge(cl, [0, 1])
    assert int((cl.labels() == 0).sum()) >= curation.SPECTRAL_MIN  # spectral clustering, not k-means
    curation.split(cl, 0, 2)
    pieces = cl.labels()[truth <= 1]
    assert {tuple(np.unique(pieces[truth[truth <= 1] == t])) for t in (0, 1)} == {(0,), (3,)}
    _consistent(cl)


def test_restore_and_conflicts(cl: Clustering) -> None:
    curation.rename(cl, 0, "first")
    with pytest.raises(RevisionConflict, match="at revision 1, not 0"):
        curation.rename(cl, 0, "second", expected=0)
    out = curation.restore(cl, 0, expected=1)
    assert out.revision == 2 and cl.state().clusters[0].name == "cluster 0"
    assert clustering.open(cl.path).result().edits[-1].op == "restore"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda cl: curation.rename(cl, 9, "x"), "cluster 9 does not exist"),
        (lambda cl: curation.rename(cl, 0, "   "), "must not be empty"),
        (lambda cl: curation.rename(cl, 0, "a\x00b"), "control"),
        (lambda cl: curation.rename(cl, 0, "x" * 201), "limit is 200"),
        (lambda cl: curation.merge(cl, [1, 1]), "at least two different"),
        (lambda cl: curation.move(cl, [], 1), "at least one image"),
        (lambda cl: curation.move(cl, [10_000], 1), "row indices must be in 0..47"),
        (lambda cl: curation.split(cl, 0, 1), "parts must be a whole number in 2..20"),
        (lambda cl: curation.split(cl, 0, 7), "needs at least 14"),
        (lambda cl: curation.restore(cl, 5), "revision 5 does not exist"),
        (lambda cl: curation.mark_outliers(cl, list(range(48))), "without clusters"),
    ],
)
def test_bad_edits_are_one_line_errors(
    cl: Clustering, edit: Callable[[Clustering], object], message: str
) -> None:
    with pytest.raises(CurationError, match=message):
        edit(cl)
    assert cl.revision == 0
