"""End-to-end ``run_cluster`` on real photos: offline encoder, tiny CLIP with names and captions, resuming;
the default partition stage on synthetic subspaces, where k-means fails."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import jsonschema
import pytest
from synthetic import subspace_mixture, write_store

from cpp import pipeline
from cpp.encoders import UnsupportedVocabulary
from cpp.errors import CppError
from cpp.metrics import clustering_accuracy
from cpp.options import ClusterOptions, SourceSpec
from cpp.pipeline import PipelineError, read_assignments, run_cluster
from cpp.progress import Cancelled, ProgressEvent, RunControl
from cpp.readout import kmeans_baseline
from cpp.result import ClusterResult, json_schema

SCHEMA = json_schema()


def _folder(photo_dir: Path) -> SourceSpec:
    return SourceSpec(type="folder", path=str(photo_dir), labels_from_folders=True)


def _check_result(result: ClusterResult, work_dir: Path, n: int) -> None:
    written = json.loads((work_dir / "result.json").read_text())
    jsonschema.validate(written, SCHEMA)
    assert ClusterResult.model_validate(written).model_dump(mode="json") == result.model_dump(mode="json")
    assert sum(c.size for c in result.clusters) == n == result.run.counts.embedded
    assert [c.id for c in result.clusters] == list(range(len(result.clusters)))
    assert result.run.k_selection.k == len(result.clusters)
    assert set(result.run.timings_s) == {"embed", "fit", "readout", "name", "total"}
    for cluster in result.clusters:
        assert 1 <= len(cluster.representatives) <= min(5, cluster.size)
        assert len(cluster.alternatives) == 5


def test_offline_encoder_end_to_end(photo_dir: Path, tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    options = ClusterOptions(model="effnet-lite0-in1k", device="cpu")
    result = run_cluster(_folder(photo_dir), options, tmp_path / "work", control=RunControl(events.append))
    _check_result(result, tmp_path / "work", 8)
    assert {"embed", "fit", "readout", "name"} <= {e.stage for e in events}
    assert result.run.encoder["id"] == "effnet-lite0-in1k"
    assert result.run.head["type"] == "none"  # 8 images: clustered without a head
    assert result.run.k_selection.method == "silhouette" and 2 <= result.run.k_selection.k <= 4
    assert result.metrics is not None and set(result.metrics) == {"acc", "nmi", "ari", "labelled"}
    assert result.assignments is not None and len(result.assignments) == 8
    truths = {a.true_label for a in result.assignments}
    assert truths == {"animals", "people", "objects", "space"}
    assert all(a.label for a in result.assignments)
    assert {a.key for a in result.assignments} == {
        str(p.relative_to(photo_dir)) for p in photo_dir.rglob("*.jpg")
    }


def test_tiny_clip_with_user_vocabulary_and_captions(
    photo_dir: Path, tmp_path: Path, tiny_clip_spec: str
) -> None:
    names = tmp_path / "names.txt"
    names.write_text("# subjects\ncat\nastronaut\ncoffee cup\nrocket\ngalaxy\n", encoding="utf-8")
    listing = tmp_path / "list.csv"
    photos = sorted(photo_dir.rglob("*.jpg"))
    with listing.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "caption"])
        for photo in photos:
            writer.writerow([str(photo), f"a picture of {photo.stem}"])
    options = ClusterOptions(
        model=tiny_clip_spec, vocabulary=[str(names), "captions"], clusters=3, device="cpu"
    )
    result = run_cluster(SourceSpec(type="files", path=str(listing)), options, tmp_path / "work")
    _check_result(result, tmp_path / "work", 8)
    candidates = {"cat", "astronaut", "coffee cup", "rocket", "galaxy"} | {
        f"a picture of {p.stem}" for p in photos
    }
    assert {c.name for c in result.clusters} <= candidates
    assert result.run.naming["names_by_origin"] == {str(names): 5, "captions": 8}
    assert result.run.k_selection.method == "fixed" and len(result.clusters) == 3
    assert result.metrics is None  # no ground truth in this source


def test_resumes_after_cancel_and_reuses_features(photo_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    options = ClusterOptions(model="effnet-lite0-in1k", device="cpu")

    def cancel_at_fit(event: ProgressEvent) -> None:
        if event.stage == "fit":
            control.cancel()

    control = RunControl(cancel_at_fit)
    with pytest.raises(Cancelled):
        run_cluster(_folder(photo_dir), options, work, control=control)
    assert (work / "features" / "meta.json").is_file() and not (work / "result.json").exists()
    meta_before = (work / "features" / "meta.json").read_text()
    embed_events: list[ProgressEvent] = []
    result = run_cluster(_folder(photo_dir), options, work, control=RunControl(embed_events.append))
    assert (work / "features" / "meta.json").read_text() == meta_before  # not re-embedded
    assert not [e for e in embed_events if e.stage == "embed"]
    _check_result(result, work, 8)


def test_large_results_page_assignments_from_jsonl(
    photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "INLINE_ASSIGNMENTS_MAX", 3)
    work = tmp_path / "work"
    result = run_cluster(_folder(photo_dir), ClusterOptions(model="effnet-lite0-in1k", device="cpu"), work)
    assert result.assignments is None and result.assignments_file == "assignments.jsonl"
    _check_result(result, work, 8)
    everything, total = read_assignments(work, offset=0, limit=100)
    assert total == 8 and len(everything) == 8
    page, total = read_assignments(work, offset=5, limit=2)
    assert total == 8 and page == everything[5:7]
    assert read_assignments(work, offset=8, limit=5) == ([], 8)


def test_head_is_trained_above_the_small_collection_size(
    photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "SMALL_N", 4)
    options = ClusterOptions(model="effnet-lite0-in1k", device="cpu", epochs=2, clusters=2)
    result = run_cluster(_folder(photo_dir), options, tmp_path / "work")
    _check_result(result, tmp_path / "work", 8)
    assert result.run.head["type"] == "crate" and result.run.head["context_k"] == 2
    assert result.run.fit["epochs"] == 2 and (tmp_path / "work" / "head" / "head.safetensors").is_file()
    # The offline encoder's pooled activations are non-negative: the features' graph takes square roots.
    partition = result.run.partition
    assert partition is not None and partition.method in {"head", "features"}
    assert partition.graph == "sqrt-centred" and set(partition.coding_length) == {"head", "features"}


def test_default_partition_finds_subspaces_where_kmeans_fails(tmp_path: Path) -> None:
    # 10 random 3-D subspaces of R^32 through (almost) the origin: their points share no centre to find.
    x, y = subspace_mixture(2000, 32, 10, 3, seed=5)
    store = write_store(tmp_path / "features", x, 500)
    found = {}
    for clusters in (10, "auto"):  # one head: the second clusterer reuses the first one's fit
        options = ClusterOptions(model="effnet-lite0-in1k", device="cpu", clusters=clusters)
        clusterer = pipeline.choose_clusterer(len(store), options, tmp_path / "head")
        assert isinstance(clusterer, pipeline.HeadClusterer)
        clusterer.fit(store, RunControl())
        found[clusters] = clusterer.partition(store, RunControl())[0]
    kmeans = clustering_accuracy(y, kmeans_baseline(x, 10))
    assert kmeans < 0.5 and clustering_accuracy(y, found[10].labels) > 0.95
    assert 8 <= found["auto"].k_selection.k <= 12  # within ±25 % of 10
    assert clustering_accuracy(y, found["auto"].labels) > kmeans + 0.3


def test_bad_requests_are_user_errors(photo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="at most 4"):
        run_cluster(
            _folder(photo_dir), ClusterOptions(model="effnet-lite0-in1k", clusters=5), tmp_path / "w1"
        )
    with pytest.raises(CppError, match="unknown encoder"):
        run_cluster(_folder(photo_dir), ClusterOptions(model="nope"), tmp_path / "w2")
    with pytest.raises(PipelineError, match="does not exist"):
        read_assignments(tmp_path / "w3")


def test_vocabulary_problems_fail_before_embedding(photo_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    names = tmp_path / "names.txt"
    names.write_text("flux capacitor\nhoverboard\n")  # no ImageNet class, no map entry
    with pytest.raises(UnsupportedVocabulary, match="no text tower"):
        run_cluster(
            _folder(photo_dir), ClusterOptions(model="effnet-lite0-in1k", vocabulary=[str(names)]), work
        )
    with pytest.raises(UnsupportedVocabulary, match="'captions' vocabulary needs"):
        run_cluster(
            _folder(photo_dir), ClusterOptions(model="effnet-lite0-in1k", vocabulary=["captions"]), work
        )
    assert not (work / "features").exists()


def test_committed_schema_is_current() -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "export_schema.py"
    spec = importlib.util.spec_from_file_location("export_schema", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.SCHEMA_PATH.read_text(encoding="utf-8") == module.render(), (
        "docs/result.schema.json is stale: run python scripts/export_schema.py"
    )
