"""Embedding runs: bad files, resume after interruption, reuse, identity checks and the CLI."""

from __future__ import annotations

import functools
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from controls import cancel_after
from photos import photo_array, write_shard
from PIL import Image

from cpp.cli import main
from cpp.embed import embed_source, plan_units
from cpp.encoders import Encoder, create_encoder
from cpp.options import SourceSpec
from cpp.progress import Cancelled, ProgressEvent, RunControl
from cpp.store import FeatureStore, StoreError


@pytest.fixture(scope="module")
def tiny_encoder(tiny_clip_spec: str) -> Encoder:
    return create_encoder(tiny_clip_spec, device="cpu")


def _folder(path: Path) -> SourceSpec:
    return SourceSpec(type="folder", path=str(path), labels_from_folders=True)


def _bomb_png() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 60_000, 60_000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_plan_units_never_cross_chunks() -> None:
    assert plan_units(0, 7, chunk_size=4, batch_size=3) == [(0, 3), (3, 4), (4, 7)]
    assert plan_units(4, 7, chunk_size=4, batch_size=3) == [(4, 7)]


def test_bad_files_are_skipped_and_odd_images_embedded(
    photo_dir: Path, tmp_path: Path, tiny_encoder: Encoder
) -> None:
    bad = photo_dir / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not an image")
    jpeg = io.BytesIO()
    Image.fromarray(photo_array("coffee")).save(jpeg, "JPEG")
    (bad / "truncated.jpg").write_bytes(jpeg.getvalue()[:3000])
    (bad / "bomb.png").write_bytes(_bomb_png())
    odd = photo_dir / "odd"
    odd.mkdir()
    Image.fromarray(photo_array("astronaut")).convert("CMYK").save(odd / "cmyk.jpg")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(odd / "grey16.png")
    Image.fromarray(photo_array("rocket")).convert("RGBA").save(odd / "alpha.png")
    Image.fromarray(photo_array("coffee")).convert("P").save(odd / "palette.gif")
    Image.fromarray(photo_array("chelsea")).save(odd / "photo.tiff")

    store = embed_source(_folder(photo_dir), tmp_path / "store", tiny_encoder, batch_size=4, workers=0)
    assert store.counts == {"items": 17, "embedded": 13, "skipped": 4}
    reasons = {Path(s.key).name: s.reason for s in store.skipped()}
    assert set(reasons) == {"empty.jpg", "text.jpg", "truncated.jpg", "bomb.png"}
    assert "empty" in reasons["empty.jpg"] and "not an image" in reasons["text.jpg"]
    assert "truncated" in reasons["truncated.jpg"] and "too large" in reasons["bomb.png"]
    features = store.features()
    assert features.shape == (13, tiny_encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=2e-3)
    assert {row.label for row in store.rows()} == {"animals", "objects", "people", "space", "odd"}
    assert store.meta["encoder_id"] == tiny_encoder.id


class _Killed(Exception):
    """Stands for the process being killed: nothing after it runs (unlike a cancel)."""


def _count_encoded(monkeypatch: pytest.MonkeyPatch, encoder: Encoder, *, kill_at: int = 0) -> list[int]:
    """The sizes of the batches ``encoder`` encodes from now on; its ``kill_at``-th batch (0: none) raises
    :class:`_Killed` instead."""
    sizes: list[int] = []
    encode = functools.partial(type(encoder).encode_images, encoder)  # not an earlier counter

    def counted(batch: torch.Tensor) -> torch.Tensor:
        if len(sizes) + 1 == kill_at:
            raise _Killed
        sizes.append(len(batch))
        return encode(batch)

    monkeypatch.setattr(encoder, "encode_images", counted)
    return sizes


def test_resume_after_cancel_equals_uninterrupted_run(
    photo_dir: Path, tmp_path: Path, tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _folder(photo_dir)
    full = embed_source(spec, tmp_path / "full", tiny_encoder, batch_size=2, chunk_size=3, workers=0)

    control = cancel_after(4)  # units (0, 2) (2, 3) fill chunk 0, then (3, 5) is encoded and saved
    with pytest.raises(Cancelled):
        embed_source(
            spec, tmp_path / "resumed", tiny_encoder, batch_size=2, chunk_size=3, workers=0, control=control
        )
    chunks = tmp_path / "resumed" / "chunks"
    assert (chunks / "index-00000.jsonl").is_file() and list(chunks.glob("index-00001.part-*.jsonl"))
    assert not (tmp_path / "resumed" / "meta.json").exists()
    with pytest.raises(StoreError, match="unfinished"):
        FeatureStore.open(tmp_path / "resumed")

    events: list[ProgressEvent] = []
    encoded = _count_encoded(monkeypatch, tiny_encoder)
    resumed = embed_source(
        spec,
        tmp_path / "resumed",
        tiny_encoder,
        batch_size=2,
        chunk_size=3,
        workers=0,
        control=RunControl(on_progress=events.append),
    )
    assert resumed.meta["run"]["resumed_items"] == 5 and encoded == [1, 2]  # units (5, 6) (6, 8)
    assert not list(chunks.glob("*.part-*"))
    assert events[-1].done == events[-1].total == 8
    np.testing.assert_array_equal(resumed.features(np.float16), full.features(np.float16))
    assert resumed.rows() == full.rows()
    assert resumed.counts == full.counts


def test_a_killed_run_resumes_after_its_last_saved_part(
    photo_dir: Path, tmp_path: Path, tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _folder(photo_dir)
    full = embed_source(spec, tmp_path / "full", tiny_encoder, batch_size=2, workers=0)  # one chunk of 8
    encoded = _count_encoded(monkeypatch, tiny_encoder, kill_at=3)
    with pytest.raises(_Killed):
        embed_source(spec, tmp_path / "store", tiny_encoder, batch_size=2, workers=0, save_every_s=0)
    assert encoded == [2, 2]
    chunks = tmp_path / "store" / "chunks"
    assert sorted(path.name for path in chunks.glob("index-*")) == [
        "index-00000.part-00000.jsonl",
        "index-00000.part-00001.jsonl",
    ]

    encoded = _count_encoded(monkeypatch, tiny_encoder)
    resumed = embed_source(spec, tmp_path / "store", tiny_encoder, batch_size=2, workers=0, save_every_s=0)
    assert encoded == [2, 2]  # items 4..7 only
    assert resumed.meta["run"]["resumed_items"] == 4
    assert sorted(path.name for path in chunks.iterdir()) == ["features-00000.npy", "index-00000.jsonl"]
    np.testing.assert_array_equal(resumed.features(np.float16), full.features(np.float16))
    assert resumed.rows() == full.rows() and resumed.counts == full.counts


def test_changing_only_where_labels_come_from_reuses_the_features(
    photo_dir: Path, tmp_path: Path, tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    unlabelled = SourceSpec(type="folder", path=str(photo_dir))
    labelled = _folder(photo_dir)
    reference = embed_source(labelled, tmp_path / "reference", tiny_encoder, batch_size=3, workers=0)
    first = embed_source(unlabelled, tmp_path / "store", tiny_encoder, batch_size=3, workers=0)
    features = first.features(np.float16)
    assert {row.label for row in first.rows()} == {None}

    encoded = _count_encoded(monkeypatch, tiny_encoder)
    again = embed_source(labelled, tmp_path / "store", tiny_encoder, batch_size=3, workers=0)
    assert encoded == []
    assert again.rows() == reference.rows() and again.source["labels_from_folders"] is True
    np.testing.assert_array_equal(again.features(np.float16), features)

    # A partial store too: cancelled without labels, resumed with them.
    with pytest.raises(Cancelled):
        embed_source(
            unlabelled, tmp_path / "partial", tiny_encoder, batch_size=3, workers=0, control=cancel_after(3)
        )
    encoded.clear()
    resumed = embed_source(labelled, tmp_path / "partial", tiny_encoder, batch_size=3, workers=0)
    assert encoded == [3, 2] and resumed.rows() == reference.rows()
    np.testing.assert_array_equal(resumed.features(np.float16), features)


def test_other_coco_annotations_of_the_same_images_reuse_the_features(
    photo_dir: Path, tmp_path: Path, tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = tmp_path / "val"
    images.mkdir()
    for photo in sorted(photo_dir.rglob("*.jpg"))[:3]:
        (images / photo.name).write_bytes(photo.read_bytes())
    listed = [{"id": i, "file_name": path.name} for i, path in enumerate(sorted(images.iterdir()))]
    captions = {"images": listed, "annotations": [{"image_id": 0, "caption": "a photo"}]}
    instances = {
        "images": listed,
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"image_id": i, "category_id": 1, "area": 1.0} for i in range(3)],
    }
    for name, data in (("captions.json", captions), ("instances.json", instances)):
        (tmp_path / name).write_text(json.dumps(data))

    def coco(*files: str) -> SourceSpec:
        return SourceSpec(type="coco", path=str(images), annotations=[str(tmp_path / f) for f in files])

    first = embed_source(coco("captions.json"), tmp_path / "store", tiny_encoder, workers=0)
    assert [row.captions for row in first.rows()] == [("a photo",), (), ()]
    encoded = _count_encoded(monkeypatch, tiny_encoder)
    both = embed_source(coco("instances.json", "captions.json"), tmp_path / "store", tiny_encoder, workers=0)
    assert encoded == []
    assert [(row.label, row.captions) for row in both.rows()] == [("thing", ("a photo",))] + [
        ("thing", ())
    ] * 2
    (images / "extra.jpg").write_bytes(next(photo_dir.rglob("hubble.jpg")).read_bytes())
    with pytest.raises(StoreError, match="other images"):
        embed_source(coco("instances.json"), tmp_path / "store", tiny_encoder, workers=0)


def _shards(photo_dir: Path, root: Path) -> SourceSpec:
    """The photos as three webdataset shards (one of them empty)."""
    photos = sorted(photo_dir.rglob("*.jpg"))
    root.mkdir()
    for shard, part in enumerate([photos[:5], [], photos[5:]]):
        write_shard(root / f"{shard}.tar", {p.stem: (p.read_bytes(), p.stem) for p in part})
    return SourceSpec(type="webdataset", path=str(root / "{0..2}.tar"))


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_worker_processes_give_the_same_store(
    kind: str, photo_dir: Path, tmp_path: Path, tiny_encoder: Encoder
) -> None:
    spec = _folder(photo_dir) if kind == "folder" else _shards(photo_dir, tmp_path / "shards")
    serial = embed_source(spec, tmp_path / "serial", tiny_encoder, batch_size=3, workers=0, dtype="float32")
    parallel = embed_source(
        spec, tmp_path / "parallel", tiny_encoder, batch_size=3, workers=2, dtype="float32"
    )
    np.testing.assert_array_equal(parallel.features(), serial.features())
    assert parallel.rows() == serial.rows()


def test_complete_store_is_reused_and_other_encoder_refused(
    photo_dir: Path, tmp_path: Path, tiny_encoder: Encoder
) -> None:
    spec = _folder(photo_dir)
    first = embed_source(spec, tmp_path / "store", tiny_encoder, workers=0)
    meta_mtime = (tmp_path / "store" / "meta.json").stat().st_mtime_ns
    again = embed_source(spec, tmp_path / "store", tiny_encoder, workers=0)
    assert again.meta == first.meta
    assert (tmp_path / "store" / "meta.json").stat().st_mtime_ns == meta_mtime

    other_source = SourceSpec(type="folder", path=str(photo_dir / "animals"))
    with pytest.raises(StoreError, match="another encoder or source"):
        embed_source(other_source, tmp_path / "store", tiny_encoder, workers=0)


def test_cli_embed_and_encoders(
    photo_dir: Path, tmp_path: Path, tiny_clip_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli-store"
    code = main(
        [
            "embed",
            str(photo_dir),
            "--out",
            str(out),
            "--model",
            tiny_clip_spec,
            "--workers",
            "0",
            "--labels-from-folders",
            "--quiet",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"items": 8, "embedded": 8, "skipped": 0}
    assert summary["encoder"] == FeatureStore.open(out).encoder_id
    assert main(["embed", str(tmp_path / "missing"), "--out", str(out), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["embed", str(photo_dir), "--out", str(tmp_path / "o2"), "--model", "nope", "--quiet"]) == 2
    assert "unknown encoder" in capsys.readouterr().err
    assert main(["encoders"]) == 0
    listing = capsys.readouterr().out
    assert "open_clip" in listing and "effnet-lite0-in1k" in listing and "auto resolves here to" in listing
