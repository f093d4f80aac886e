"""Sources listed with allowed roots read only files inside them, checked as each file is opened."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from photos import save_photo, write_shard

from cpp.embed import embed_source
from cpp.encoders import Encoder, create_encoder
from cpp.errors import SourceError
from cpp.options import SourceSpec
from cpp.sources import OUTSIDE_ROOTS, OutsideRootsError, Roots, confine_roots, iter_items, read_failure
from cpp.vocab import VocabularyError, resolve_vocabulary


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """``root`` (allowed) with two photos, and ``outside`` with one photo and a text file."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    save_photo("coffee", root / "a" / "coffee.jpg")
    save_photo("rocket", root / "a" / "rocket.png")
    save_photo("chelsea", outside / "secret.jpg")
    (outside / "passwd").write_text("root:x:0:0\n")
    return root, outside


def _keys_and_reasons(spec: SourceSpec, roots: Roots) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in iter_items(spec, roots):
        try:
            item.load_bytes()
            out[item.key] = None
        except OSError as exc:
            out[item.key] = read_failure(exc)
    return out


def test_symlinked_files_pointing_outside_are_refused_when_read(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    (root / "a" / "link.jpg").symlink_to(outside / "secret.jpg")
    (root / "a" / "passwd.png").symlink_to(outside / "passwd")
    (root / "a" / "inside.jpg").symlink_to(root / "a" / "coffee.jpg")  # a link inside the root is fine
    roots = confine_roots([root])
    reasons = _keys_and_reasons(SourceSpec(type="folder", path=str(root)), roots)
    assert reasons == {
        "a/coffee.jpg": None,
        "a/inside.jpg": None,
        "a/link.jpg": OUTSIDE_ROOTS,
        "a/passwd.png": OUTSIDE_ROOTS,
        "a/rocket.png": None,
    }
    # Without roots (the command line) the same links are read; empty roots allow nothing.
    with pytest.raises(SourceError, match=OUTSIDE_ROOTS):
        _keys_and_reasons(SourceSpec(type="folder", path=str(root)), ())
    assert all(v is None for v in _keys_and_reasons(SourceSpec(type="folder", path=str(root)), None).values())


def test_folder_replaced_by_a_link_after_listing_is_not_read(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    spec = SourceSpec(type="folder", path=str(root))
    roots = confine_roots([root])
    items = list(iter_items(spec, roots))  # listed (checked) while the folder is real
    (root / "a").rename(root.parent / "moved")
    (outside / "a").mkdir()
    save_photo("coffee", outside / "a" / "coffee.jpg")
    (root / "a").symlink_to(outside / "a")
    coffee = next(item for item in items if item.key == "a/coffee.jpg")
    with pytest.raises(OutsideRootsError):
        coffee.load_bytes()
    # The source folder itself swapped for a link is refused when listed.
    swapped = root.parent / "swapped"
    swapped.symlink_to(outside, target_is_directory=True)
    with pytest.raises(SourceError, match=OUTSIDE_ROOTS):
        list(iter_items(SourceSpec(type="folder", path=str(swapped)), roots))


def test_coco_file_names_that_leave_the_root(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    annotations = root / "instances.json"
    images = [
        {"id": 1, "file_name": "a/coffee.jpg"},
        {"id": 2, "file_name": f"../{outside.name}/secret.jpg"},
        {"id": 3, "file_name": str(outside / "secret.jpg")},
    ]
    annotations.write_text(
        json.dumps({"images": images, "categories": [{"id": 7, "name": "cup"}], "annotations": []})
    )
    spec = SourceSpec(type="coco", path=str(root), annotations=[str(annotations)])
    reasons = _keys_and_reasons(spec, confine_roots([root]))
    assert reasons[f"../{outside.name}/secret.jpg"] == OUTSIDE_ROOTS
    assert reasons[str(outside / "secret.jpg")] == OUTSIDE_ROOTS
    assert reasons["a/coffee.jpg"] is None


def test_coco_images_without_annotations_are_listed_unlabelled(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    annotations = root / "instances.json"
    annotations.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a/coffee.jpg"}],
                "categories": [{"id": 7, "name": "cup"}],
                "annotations": [{"image_id": 1, "category_id": 7, "area": 5.0}],
            }
        )
    )
    items = list(iter_items(SourceSpec(type="coco", path=str(root), annotations=[str(annotations)])))
    assert [(item.key, item.label) for item in items] == [("a/coffee.jpg", "cup"), ("a/rocket.png", None)]


def test_coco_annotation_file_outside_is_refused(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    (outside / "instances.json").write_text(json.dumps({"images": []}))
    link = root / "instances.json"
    link.symlink_to(outside / "instances.json")
    spec = SourceSpec(type="coco", path=str(root), annotations=[str(link)])
    with pytest.raises(SourceError, match=r"COCO annotation file .* outside allowed roots"):
        list(iter_items(spec, confine_roots([root])))


def test_shards_outside_the_root(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    jpeg = (root / "a" / "coffee.jpg").read_bytes()
    shards = root / "shards"
    shards.mkdir()
    write_shard(shards / "00000.tar", {"k0": (jpeg, "a cup")})
    write_shard(outside / "evil.tar", {"k1": (jpeg, "not yours")})
    (shards / "00001.tar").symlink_to(outside / "evil.tar")
    roots = confine_roots([root])
    glob_spec = SourceSpec(type="webdataset", path=str(shards / "*.tar"))
    assert [item.key for item in iter_items(glob_spec, roots)] == ["00000.tar/k0"]
    assert len(list(iter_items(glob_spec))) == 2  # unconfined, the link is a shard like any other
    named = SourceSpec(type="webdataset", path=str(shards / "{00000..00001}.tar"))
    with pytest.raises(SourceError, match=r"shard .*00001\.tar.* outside allowed roots"):
        list(iter_items(named, roots))
    only_outside = SourceSpec(type="webdataset", path=str(shards / "0000[1].tar"))
    with pytest.raises(SourceError, match="1 outside the allowed roots"):
        list(iter_items(only_outside, roots))


def test_file_list_entries_outside_are_skipped(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    listing = root / "list.txt"
    listing.write_text(f"a/coffee.jpg\n{outside / 'secret.jpg'}\n../outside/passwd\n")
    reasons = _keys_and_reasons(SourceSpec(type="files", path=str(listing)), confine_roots([root]))
    assert reasons == {
        "a/coffee.jpg": None,
        str(outside / "secret.jpg"): OUTSIDE_ROOTS,
        "../outside/passwd": OUTSIDE_ROOTS,
    }


@pytest.fixture(scope="module")
def tiny_encoder(tiny_clip_spec: str) -> Encoder:
    return create_encoder(tiny_clip_spec, device="cpu")


def test_embedding_records_the_reason(
    layout: tuple[Path, Path], tmp_path: Path, tiny_encoder: Encoder
) -> None:
    root, outside = layout
    os.symlink(outside / "secret.jpg", root / "a" / "link.jpg")
    spec = SourceSpec(type="folder", path=str(root))
    store = embed_source(spec, tmp_path / "store", tiny_encoder, batch_size=2, workers=0, roots=(root,))
    assert store.counts == {"items": 3, "embedded": 2, "skipped": 1}
    assert [(s.key, s.reason) for s in store.skipped()] == [("a/link.jpg", OUTSIDE_ROOTS)]


def test_non_regular_files_are_refused_without_blocking(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    os.mkfifo(root / "a" / "pipe.jpg")  # opening a FIFO for reading would wait for a writer
    reasons = _keys_and_reasons(SourceSpec(type="folder", path=str(root)), confine_roots([root]))
    assert reasons["a/pipe.jpg"] is not None and "not a regular file" in reasons["a/pipe.jpg"]
    listing = root / "list.txt"
    listing.write_text("/dev/zero\n")
    assert _keys_and_reasons(SourceSpec(type="files", path=str(listing)), confine_roots([root])) == {
        "/dev/zero": OUTSIDE_ROOTS
    }


def test_vocabulary_files_are_read_inside_the_roots_only(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    (outside / "names.txt").write_text("secret name\n")
    (root / "names.txt").symlink_to(outside / "names.txt")
    with pytest.raises(VocabularyError, match=OUTSIDE_ROOTS):
        resolve_vocabulary([str(root / "names.txt")], roots=confine_roots([root]))
    assert resolve_vocabulary([str(root / "names.txt")]).names == ("secret name",)  # unconfined: read
