"""Embedding runs: bad files, resume after interruption, reuse, identity checks and the CLI."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
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


def test_resume_after_cancel_equals_uninterrupted_run(
    photo_dir: Path, tmp_path: Path, tiny_encoder: Encoder
) -> None:
    spec = _folder(photo_dir)
    full = embed_source(spec, tmp_path / "full", tiny_encoder, batch_size=2, chunk_size=3, workers=0)

    control = cancel_after(4)  # after the first chunk
    with pytest.raises(Cancelled):
        embed_source(
            spec, tmp_path / "resumed", tiny_encoder, batch_size=2, chunk_size=3, workers=0, control=control
        )
    assert (tmp_path / "resumed" / "chunks" / "index-00000.jsonl").is_file()
    assert not (tmp_path / "resumed" / "meta.json").exists()
    with pytest.raises(StoreError, match="unfinished"):
        FeatureStore.open(tmp_path / "resumed")

    events: list[ProgressEvent] = []
    resumed = embed_source(
        spec,
        tmp_path / "resumed",
        tiny_encoder,
        batch_size=2,
        chunk_size=3,
        workers=0,
        control=RunControl(on_progress=events.append),
    )
    assert resumed.meta["run"]["resumed_items"] == 3
    assert events[-1].done == events[-1].total == 8
    np.testing.assert_array_equal(resumed.features(np.float16), full.features(np.float16))
    assert resumed.rows() == full.rows()
    assert resumed.counts == full.counts


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
