"""Assigning new images to a clustering (cpp.assign, `cpp assign`): its own images keep their clusters, edits
are followed, other encoders and unusable sources are refused, a killed run resumes to the same output;
`--update` adds the images as a revision once."""

from __future__ import annotations

import functools
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpp import assign as assign_module
from cpp import clustering, curation, gallery, pipeline
from cpp.assign import AssignError, assign, iter_results, load_summary, read_results, update
from cpp.cli import main
from cpp.encoders import Encoder, create_encoder
from cpp.encoders.views import FlipViews
from cpp.options import AssignOptions, ClusterOptions, SourceSpec
from cpp.pipeline import SMALL_N, run_cluster
from cpp.progress import Cancelled
from cpp.result import Edit
from cpp.store import FeatureStore
from cpp.thumbnails import Thumbnails

CLASSES = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}
PER_CLASS = 86  # 258 images: above SMALL_N, so a head is trained


def _draw(path: Path, colour: tuple[int, int, int], seed: int, *, mirror: bool = False) -> None:
    """A 32 px image: the class colour with a random pattern of brighter squares."""
    rng = np.random.default_rng(seed)
    array = np.empty((32, 32, 3), dtype=np.uint8)
    array[:] = colour
    for _ in range(4):
        y, x = rng.integers(0, 24, size=2)
        array[y : y + 8, x : x + 8] = np.clip(np.array(colour) + rng.integers(20, 60, size=3), 0, 255)
    array = (array.astype(np.int16) + rng.integers(-12, 12, size=array.shape)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(array[:, ::-1] if mirror else array)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _collection(root: Path, per_class: int, *, offset: int = 0, mirror: bool = False) -> Path:
    for c, (name, colour) in enumerate(CLASSES.items()):
        for i in range(per_class):
            _draw(root / name / f"{name}_{offset + i:04d}.png", colour, 1000 * c + offset + i, mirror=mirror)
    return root


def _folder(path: Path) -> SourceSpec:
    return SourceSpec(type="folder", path=str(path), labels_from_folders=True)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    """The offline encoder (a random-weight model maps all these images within 1e-4 of one another)."""
    return create_encoder("effnet-lite0-in1k", device="cpu")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, encoder: Encoder) -> tuple[Path, Path]:
    """A head-space clustering of 258 images in 3 colour classes: (its images, its work directory).

    The head's partition is kept whatever the coding lengths say (on these images the features' partition
    codes them in fewer bits), so that assignment runs through a head: context tokens, head codes.
    """
    base = tmp_path_factory.mktemp("assign")
    images = _collection(base / "images", PER_CLASS)
    options = ClusterOptions(model=encoder.id, clusters=3, epochs=2, vocabulary=["cifar10"], device="cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "feature_coding_lengths", lambda *_, **__: {"head": 0.0, "features": 1.0})
        run_cluster(_folder(images), options, base / "work", encoder=encoder)
    return images, base / "work"


@pytest.fixture
def work(fitted: tuple[Path, Path], tmp_path: Path) -> Path:
    """A copy of the fitted clustering that a test may edit."""
    shutil.copytree(fitted[1], tmp_path / "clustering")
    return tmp_path / "clustering"


def _clusters_by_key(work_dir: Path) -> dict[str, int]:
    found = clustering.open(work_dir)
    page, total = found.assignments(limit=10_000)
    assert len(page) == total
    return {a.key: a.cluster for a in page}


def test_own_images_reproduce_their_clusters(
    fitted: tuple[Path, Path], encoder: Encoder, tmp_path: Path
) -> None:
    images, work_dir = fitted
    assert clustering.open(work_dir).manifest.space == "head" and 3 * PER_CLASS >= SMALL_N
    summary = assign(work_dir, _folder(images), tmp_path / "a", encoder=encoder)
    records = list(iter_results(tmp_path / "a"))
    expected = _clusters_by_key(work_dir)
    names = [c.name for c in clustering.open(work_dir).state().clusters]
    assert [r.key for r in records] == sorted(expected) and len(records) == 3 * PER_CLASS
    assert all(r.member and not r.novel for r in records)
    assert {r.key: r.cluster for r in records} == expected
    assert all(r.name == names[r.cluster] for r in records)
    assert summary.members == summary.embedded == 3 * PER_CLASS and summary.novel == 0
    assert [c.assigned for c in summary.clusters] == [c.members for c in summary.clusters]


def test_the_rule_for_new_images_reproduces_most_members(
    fitted: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the member look-up, the nearest-subspace rule itself files the members as the readout did
    (the readout's spectral labels and the nearest subspace agree for most rows)."""
    _, work_dir = fitted
    found = clustering.open(work_dir)
    monkeypatch.setattr(assign_module, "MEMBER_SIMILARITY", 2.0)  # no image counts as a member
    scorer = assign_module.Assigner(found, device="cpu")
    store = FeatureStore.open(work_dir / "features")
    scored = scorer.score(store.features())
    assert not scored.member.any()
    assert (scored.cluster == found.labels()).mean() >= 0.9
    assert scored.novel.mean() <= 0.2  # members are typical of their clusters


def test_new_images_follow_the_newest_revision(
    work: Path, fitted: tuple[Path, Path], encoder: Encoder
) -> None:
    """A merge and a rename: new images land in the merged cluster, under its current name."""
    found = clustering.open(work)
    old = found.state()
    labels = found.labels()
    merged = np.where(labels == 2, 1, labels)
    clusters = [
        old.clusters[0],
        old.clusters[1].model_copy(update={"name": "merged", "size": int((merged == 1).sum())}),
    ]
    found.commit(merged, clusters, Edit(op="merge", args={"clusters": [1, 2]}))
    fresh = _collection(work.parent / "fresh", 10, offset=500, mirror=True)
    assign(work, _folder(fresh), work.parent / "a", encoder=encoder)
    records = list(iter_results(work.parent / "a"))
    assert records and not any(r.member for r in records)
    assert {r.cluster for r in records} <= {0, 1}
    assert all(r.name == ("merged" if r.cluster == 1 else old.clusters[0].name) for r in records)
    summary = load_summary(work.parent / "a")
    assert summary.clustering["revision"] == 1 and len(summary.clusters) == 2


def test_novelty_quantile_recalibrates_and_pages_read_back(
    fitted: tuple[Path, Path], encoder: Encoder, tmp_path: Path
) -> None:
    _, work_dir = fitted
    fresh = _collection(tmp_path / "fresh", 5, offset=700)
    everything = assign(
        work_dir,
        _folder(fresh),
        tmp_path / "all",
        encoder=encoder,
        options=AssignOptions(novelty_quantile=1.0),
    )
    none = assign(
        work_dir,
        _folder(fresh),
        tmp_path / "none",
        encoder=encoder,
        options=AssignOptions(novelty_quantile=0.0),
    )
    # thresholds: the highest and the lowest score of the members the novelty model was not fitted on
    assert (everything.novelty.quantile, none.novelty.quantile) == (1.0, 0.0)
    assert none.novelty.threshold < everything.novelty.threshold
    assert everything.embedded == 15 and none.novel < everything.novel and everything.novel >= 8
    lines, total = read_results(tmp_path / "all", offset=10, limit=100)
    assert total == 15 and len(lines) == 5
    assert [json.loads(line)["key"] for line in lines] == [r.key for r in iter_results(tmp_path / "all")][10:]


def test_another_encoder_or_preprocessing_is_refused(
    work: Path, encoder: Encoder, tmp_path: Path, fitted: tuple[Path, Path], tiny_clip_spec: str
) -> None:
    images, _ = fitted
    other = create_encoder(tiny_clip_spec, device="cpu")
    with pytest.raises(AssignError, match=r"another encoder or preprocessing.*id: clustering"):
        assign(work, _folder(images), tmp_path / "a", encoder=other)
    with pytest.raises(AssignError, match=r"views: clustering None, here 'flip'"):  # same weights, 2 views
        assign(work, _folder(images), tmp_path / "a", encoder=FlipViews(encoder))
    manifest = json.loads((work / clustering.MANIFEST_FILE).read_text())
    manifest["encoder"]["preprocess"] = {**manifest["encoder"]["preprocess"], "interpolation": "nearest"}
    (work / clustering.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(AssignError, match="preprocess: clustering"):
        assign(work, _folder(images), tmp_path / "b", encoder=encoder)
    assert not (tmp_path / "b" / "features").exists()  # refused before any embedding


def test_an_empty_or_all_bad_source_is_a_clear_error(
    fitted: tuple[Path, Path], encoder: Encoder, tmp_path: Path
) -> None:
    _, work_dir = fitted
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.png").write_text("not an image")
    with pytest.raises(AssignError, match=r"none of the 2 files of .* is a usable image: .*empty\.jpg"):
        assign(work_dir, _folder(bad), tmp_path / "a", encoder=encoder)
    (tmp_path / "nothing").mkdir()
    assert main(["assign", str(work_dir), str(tmp_path / "nothing"), "--out", str(tmp_path / "o.jsonl")]) == 2


class _Killed(Exception):
    """Stands for the process being killed: nothing after it runs."""


def test_a_killed_assignment_resumes_with_an_identical_output(
    fitted: tuple[Path, Path], encoder: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, work_dir = fitted
    fresh = _collection(tmp_path / "fresh", 8, offset=900, mirror=True)
    options = AssignOptions(batch_size=4)
    assign(work_dir, _folder(fresh), tmp_path / "whole", encoder=encoder, options=options)

    encode = functools.partial(type(encoder).encode_images, encoder)
    batches: list[int] = []

    def dies_at_the_fourth(batch: torch.Tensor) -> torch.Tensor:
        if len(batches) == 3:
            raise _Killed
        batches.append(len(batch))
        time.sleep(0.8)  # so that a part is saved (every cpp.embed.SAVE_EVERY_S = 2 s) before the kill
        return encode(batch)

    monkeypatch.setattr(encoder, "encode_images", dies_at_the_fourth)
    with pytest.raises(_Killed):
        assign(work_dir, _folder(fresh), tmp_path / "killed", encoder=encoder, options=options)
    assert list((tmp_path / "killed" / "features" / "chunks").glob("index-*.part-*"))
    assert not (tmp_path / "killed" / "assignments.jsonl").exists()
    monkeypatch.undo()
    resumed = assign(work_dir, _folder(fresh), tmp_path / "killed", encoder=encoder, options=options)
    store = FeatureStore.open(tmp_path / "killed" / "features")
    assert store.meta["run"]["resumed_items"] in (8, 12) and resumed.embedded == 24
    for name in ("assignments.jsonl", "assignments.idx.npy"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_a_cancelled_assignment_stops_between_batches(
    fitted: tuple[Path, Path], encoder: Encoder, tmp_path: Path
) -> None:
    from controls import cancel_after

    _, work_dir = fitted
    fresh = _collection(tmp_path / "fresh", 4, offset=950)
    with pytest.raises(Cancelled):
        assign(
            work_dir,
            _folder(fresh),
            tmp_path / "a",
            encoder=encoder,
            options=AssignOptions(batch_size=2),
            control=cancel_after(4),
        )
    assert not (tmp_path / "a" / "summary.json").exists()


def test_cli_writes_the_lines_and_the_summary(
    fitted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, work_dir = fitted
    out, summary = tmp_path / "new.jsonl", tmp_path / "summary.json"
    code = main(
        [
            "assign",
            str(work_dir / "result.json"),  # the result JSON names its clustering
            str(images / "red"),
            "--out",
            str(out),
            "--summary",
            str(summary),
            "--work-dir",
            str(tmp_path / "w"),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    lines = out.read_text().splitlines()
    assert len(lines) == PER_CLASS and all(json.loads(line)["member"] for line in lines)
    report = json.loads(summary.read_text())
    assert sum(c["assigned"] for c in report["clusters"]) == PER_CLASS
    assert "already members" in capsys.readouterr().out
    assert main(["assign", str(tmp_path / "missing"), str(images), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_update_adds_the_images_as_a_revision_with_a_novel_pool(work: Path, encoder: Encoder) -> None:
    """``update`` files the assigned images under their clusters (sizes grow by the filed count), keeps the
    novel ones in the pool, stores their features, rewrites the result; a reopened clustering shows it all."""
    before = clustering.open(work)
    fitted_members, old_sizes = before.manifest.members, [c.size for c in before.state().clusters]
    old_labels = before.labels()
    fresh = _collection(work.parent / "fresh", 10, offset=500, mirror=True)
    options = AssignOptions(novelty_quantile=0.5, device="cpu")  # about half of them novel: both paths run
    assign(work, _folder(fresh), work.parent / "a", encoder=encoder, options=options)
    records = list(iter_results(work.parent / "a"))
    novel = [i for i, r in enumerate(records) if r.novel]
    assert 0 < len(novel) < len(records) == 30 and not any(r.member for r in records)

    outcome = update(work, work.parent / "a")
    assert (outcome.revision, outcome.added, outcome.novel) == (1, 30, len(novel))
    assert outcome.filed == 30 - len(novel) and outcome.already_members == 0

    found = clustering.open(work)  # reopened: the grown manifest
    assert found.manifest.members == fitted_members + 30 and found.manifest.fitted_members == fitted_members
    filed = np.bincount([r.cluster for r in records if not r.novel], minlength=len(old_sizes))
    assert [c.size for c in found.state().clusters] == (np.array(old_sizes) + filed).tolist()
    assert found.novel_pool().tolist() == [fitted_members + i for i in novel]
    labels = found.labels()
    assert labels[:fitted_members].tolist() == old_labels.tolist()
    assert labels[fitted_members:].tolist() == [-1 if r.novel else r.cluster for r in records]
    edit = found.state().edit
    assert edit is not None and edit.op == "update" and edit.args["kind"] == "assign-update"
    assert edit.args["added"] == 30 and edit.args["novel"] == len(novel)
    result = found.result()
    assert result.revision == 1 and result.edits[-1].args["kind"] == "assign-update"
    page, total = found.assignments(offset=fitted_members, limit=100)
    assert total == fitted_members + 30 and [a.key for a in page] == [r.key for r in records]
    assert [c.size for c in result.clusters] == [c.size for c in found.state().clusters]
    store = found.member_store()
    added = FeatureStore.open(work.parent / "a" / "features").features()
    assert len(store) == found.manifest.members
    np.testing.assert_array_equal(store.take(np.arange(fitted_members, fitted_members + 30)), added)
    members = curation.members(found)
    assert len(members) == found.manifest.members
    for cluster in found.state().clusters:  # representatives are members of their cluster
        rows = [members.row_of(shown) for shown in cluster.representatives]
        assert rows and all(row is not None and labels[row] == cluster.id for row in rows)
    assert gallery.projection(found).shape == (found.manifest.members, 2)
    thumbnail = Thumbnails(found, size=32).path(fitted_members)  # read through the addition's source
    assert Image.open(thumbnail).size == (32, 32)
    outliers = gallery.cluster_page(found, -1, limit=100)
    assert {m["row"] for m in outliers["members"]} >= set(found.novel_pool().tolist())

    restored = curation.restore(found, 0)  # before the update: the added images are in no cluster
    assert clustering.open(work).labels(restored.revision)[fitted_members:].tolist() == [-1] * 30


def test_repeating_an_update_adds_nothing(work: Path, encoder: Encoder) -> None:
    """A second assignment of the same images finds them members and adds nothing; an update against a
    revision that moved on is refused."""
    fresh = _collection(work.parent / "fresh", 5, offset=700, mirror=True)
    assign(work, _folder(fresh), work.parent / "a", encoder=encoder)
    assert update(work, work.parent / "a").added == 15
    with pytest.raises(AssignError, match="assign again"):
        update(work, work.parent / "a")  # made against revision 0, the clustering is at 1
    summary = assign(work, _folder(fresh), work.parent / "a", encoder=encoder)  # again: resumes the store
    assert summary.members == 15
    again = update(work, work.parent / "a")
    assert again.revision is None and again.added == 0 and again.already_members == 15
    found = clustering.open(work)
    assert found.revision == 1 and len(found.manifest.additions) == 1
    assert found.manifest.members == len(found.labels()) == found.manifest.fitted_members + 15


def test_an_update_stopped_before_its_revision_is_rolled_back(
    work: Path, encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = _collection(work.parent / "fresh", 4, offset=800, mirror=True)
    assign(work, _folder(fresh), work.parent / "a", encoder=encoder)

    def dies(*args: object, **kwargs: object) -> int:
        raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(clustering.Clustering, "commit", dies)
        with pytest.raises(_Killed):
            update(work, work.parent / "a")
    half = clustering.open(work)
    assert half.revision == 0 and half.manifest.members == half.manifest.fitted_members + 12
    assert (half.labels()[-12:] == -1).all()  # grown, but in no cluster until the revision exists
    assert update(work, work.parent / "a").added == 12  # the stopped batch is dropped, then added again
    found = clustering.open(work)
    assert len(found.manifest.additions) == 1 and found.manifest.members == found.manifest.fitted_members + 12


def test_cli_update_then_nothing_to_add(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh = _collection(tmp_path / "fresh", 3, offset=900, mirror=True)
    command = [
        "assign", str(work), str(fresh), "--out", str(tmp_path / "new.jsonl"), "--update",
        "--work-dir", str(tmp_path / "w"), "--device", "cpu", "--quiet",
    ]  # fmt: skip
    assert main(command) == 0, capsys.readouterr().err
    assert "added 9 images as revision 1" in capsys.readouterr().out
    assert main(command) == 0, capsys.readouterr().err
    assert "nothing to add" in capsys.readouterr().out
    assert clustering.open(work).revision == 1
