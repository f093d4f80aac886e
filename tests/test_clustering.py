"""The clustering artifact: written by every run, reopened from its folder or result JSON, revised."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cpp import clustering
from cpp.clustering import ClusteringError
from cpp.options import ClusterOptions, SourceSpec
from cpp.pipeline import run_cluster
from cpp.result import Edit


@pytest.fixture
def finished(photo_dir: Path, tmp_path: Path) -> Path:
    source = SourceSpec(type="folder", path=str(photo_dir), labels_from_folders=True)
    run_cluster(source, ClusterOptions(model="effnet-lite0-in1k", device="cpu"), tmp_path / "work")
    return tmp_path / "work"


def test_open_from_folder_and_from_a_copied_result(finished: Path, tmp_path: Path) -> None:
    opened = clustering.open(finished)
    copy = tmp_path / "elsewhere.json"
    copy.write_text((finished / "result.json").read_text())
    assert clustering.open(copy).id == opened.id == clustering.open(finished / "result.json").id
    manifest = opened.manifest
    assert manifest.model == "effnet-lite0-in1k" and manifest.space == "raw" and manifest.head is None
    assert manifest.encoder["id"] == "effnet-lite0-in1k" and manifest.members == 8
    readout = opened.readout()
    k = len(opened.result().clusters)
    assert readout.centers.shape[0] == readout.bases.shape[0] == k
    assert readout.labels.shape == readout.fit.shape == readout.confidence.shape == (8,)
    assert np.all(readout.fit <= 1 + 1e-5) and np.all(readout.fit >= -1e-6)
    assert 0 <= manifest.novelty.threshold <= float(readout.fit.max())
    assert opened.revision == 0 and opened.edits() == []
    assert np.array_equal(opened.labels(), readout.labels)


def test_revisions_are_append_only_and_restorable(finished: Path) -> None:
    opened = clustering.open(finished)
    before = opened.result()
    clusters = [c.model_copy(update={"name": "<b>renamed</b>"}) if c.id == 0 else c for c in before.clusters]
    labels = opened.labels().copy()
    labels[0] = clustering.OUTLIER
    one = opened.commit(labels, clusters, Edit(op="rename", args={"cluster": 0}))
    assert one == 1 and opened.revision == 1
    after = opened.result()
    assert after.revision == 1 and [e.op for e in after.edits] == ["rename"]
    assert after.clusters[0].name == "<b>renamed</b>"
    assert after.assignments is not None and after.assignments[0].cluster == clustering.OUTLIER
    two = opened.restore(0)
    assert two == 2 and opened.revisions() == [0, 1, 2]
    restored = opened.result()
    assert [c.model_dump() for c in restored.clusters] == [c.model_dump() for c in before.clusters]
    assert [a.cluster for a in restored.assignments or []] == [a.cluster for a in before.assignments or []]
    assert [e.op for e in restored.edits] == ["rename", "restore"]
    assert restored.edits[1].args == {"revision": 0}


def test_bad_revisions_and_paths_are_clear_errors(finished: Path, tmp_path: Path) -> None:
    opened = clustering.open(finished)
    clusters = opened.result().clusters
    with pytest.raises(ClusteringError, match="labels all 8 members"):
        opened.commit(np.zeros(3, dtype=np.int64), clusters, Edit(op="merge"))
    with pytest.raises(ClusteringError, match="cluster ids or OUTLIER"):
        opened.commit(np.full(8, len(clusters)), clusters, Edit(op="merge"))
    with pytest.raises(ClusteringError, match="revision 7 does not exist"):
        opened.state(7)
    with pytest.raises(ClusteringError, match="does not exist"):
        clustering.open(tmp_path / "nothing")
    with pytest.raises(ClusteringError, match="not a finished clustering"):
        clustering.open(tmp_path)
    (finished / "clustering.json").write_text("{")
    with pytest.raises(ClusteringError, match="damaged"):
        clustering.open(finished)
    junk = tmp_path / "junk.json"
    junk.write_text(json.dumps({"a": 1}))
    with pytest.raises(ClusteringError, match="not a cpp result JSON"):
        clustering.open(junk)
