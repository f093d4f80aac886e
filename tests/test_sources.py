"""Every source type, built from real photos inside the test, and the errors for bad specs."""

from __future__ import annotations

import functools
import io
import json
import pickle
from pathlib import Path

import pytest
from photos import save_photo, write_shard
from PIL import Image

from cpp.errors import SourceError
from cpp.options import SourceSpec
from cpp.sources import (
    Item,
    PartLists,
    PartSlice,
    SourceItems,
    expand_braces,
    infer_source_spec,
    iter_items,
)


def _spec(kind: str, path: Path | str, **kwargs: object) -> SourceSpec:
    return SourceSpec(type=kind, path=str(path), **kwargs)  # type: ignore[arg-type]


def test_folder_is_recursive_sorted_and_labelled(photo_dir: Path) -> None:
    (photo_dir / "notes.txt").write_text("not an image")
    save_photo("coffee", photo_dir / "top.PNG")
    items = list(iter_items(_spec("folder", photo_dir, labels_from_folders=True)))
    keys = [item.key for item in items]
    assert keys == sorted(keys)
    assert len(items) == 9 and "notes.txt" not in keys
    by_key = {item.key: item for item in items}
    assert by_key["animals/chelsea.jpg"].label == "animals"
    assert by_key["top.PNG"].label is None
    assert Image.open(io.BytesIO(by_key["animals/chelsea.jpg"].load_bytes())).size == (451, 300)
    unlabelled = list(iter_items(_spec("folder", photo_dir)))
    assert all(item.label is None for item in unlabelled)


def test_items_pickle_for_worker_processes(photo_dir: Path) -> None:
    item = next(iter(iter_items(_spec("folder", photo_dir))))
    clone = pickle.loads(pickle.dumps(item))
    assert clone.load_bytes() == item.load_bytes()


def test_txt_and_csv_file_lists(photo_dir: Path, tmp_path: Path) -> None:
    (photo_dir / "list.txt").write_text(
        f"# photos\nanimals/chelsea.jpg\n\n{photo_dir / 'objects/coffee.jpg'}\n"
    )
    items = list(iter_items(_spec("files", photo_dir / "list.txt")))
    assert [item.key for item in items] == ["animals/chelsea.jpg", str(photo_dir / "objects/coffee.jpg")]
    assert items[0].path == str(photo_dir / "animals/chelsea.jpg")
    assert items[0].load_bytes() == (photo_dir / "animals/chelsea.jpg").read_bytes()

    (photo_dir / "list.csv").write_text(
        'path,label,caption\nobjects/rocket.jpg,rocket,"a rocket, launching"\n'
    )
    (item,) = iter_items(_spec("files", photo_dir / "list.csv"))
    assert (item.label, item.captions) == ("rocket", ("a rocket, launching",))

    (tmp_path / "bad.csv").write_text("file\nx.jpg\n")
    with pytest.raises(SourceError, match="'path' column"):
        list(iter_items(_spec("files", tmp_path / "bad.csv")))
    (tmp_path / "dup.txt").write_text("a.jpg\na.jpg\n")
    with pytest.raises(SourceError, match="listed twice"):
        list(iter_items(_spec("files", tmp_path / "dup.txt")))


def test_webdataset_shards_with_brace_pattern(photo_dir: Path, tmp_path: Path) -> None:
    photos = sorted(photo_dir.rglob("*.jpg"))
    shards = tmp_path / "shards"
    shards.mkdir()
    for number in range(2):
        samples = {
            f"{number:05d}{i:04d}": (photo.read_bytes(), f"caption of {photo.stem}")
            for i, photo in enumerate(photos[number * 4 : number * 4 + 4])
        }
        write_shard(shards / f"{number:05d}.tar", samples)
    items = list(iter_items(_spec("webdataset", shards / "{00000..00001}.tar")))
    assert len(items) == 8
    assert items[0].key == "00000.tar/000000000"
    assert items[0].captions == (f"caption of {photos[0].stem}",)
    assert items[5].load_bytes() == photos[5].read_bytes()
    assert pickle.loads(pickle.dumps(items[5])).load_bytes() == photos[5].read_bytes()
    single = list(iter_items(infer_source_spec(str(shards / "00001.tar"))))
    assert [item.key for item in single] == [item.key for item in items[4:]]

    with pytest.raises(SourceError, match="missing"):
        list(iter_items(_spec("webdataset", shards / "{00000..00003}.tar")))
    with pytest.raises(SourceError, match="start > end"):
        list(iter_items(_spec("webdataset", shards / "{00003..00001}.tar")))
    with pytest.raises(SourceError, match="bad brace"):
        list(iter_items(_spec("webdataset", shards / "{0000x}.tar")))


def test_source_items_index_shards_like_a_list_holding_few_of_them(photo_dir: Path, tmp_path: Path) -> None:
    photos = sorted(photo_dir.rglob("*.jpg"))
    sizes = [3, 0, 4, 1, 2]  # an empty shard too
    for number, size in enumerate(sizes):
        samples = {f"{number}{i:03d}": (photos[i].read_bytes(), f"c{number}.{i}") for i in range(size)}
        write_shard(tmp_path / f"{number:05d}.tar", samples)
    spec = _spec("webdataset", tmp_path / "{00000..00004}.tar")
    expected = list(iter_items(spec))
    items = SourceItems.of(spec, cached_parts=2)
    assert len(items) == sum(sizes) == len(expected)
    keys = [item.key for item in expected]
    assert [item.key for item in items] == keys
    assert [items[i].key for i in range(-len(keys), 0)] == keys
    for start, stop in [(0, 10), (2, 5), (3, 8), (7, 7), (8, 100), (-3, -1)]:
        assert [item.key for item in items[start:stop]] == keys[start:stop]
    assert [item.key for item in items[::3]] == keys[::3]
    assert [item.captions for item in items[2:4]] == [("c0.2",), ("c2.0",)]
    assert items[4].load_bytes() == photos[1].read_bytes()
    assert len(items._lists) <= 2  # only the most recently read shards are held
    with pytest.raises(IndexError):
        items[len(keys)]

    fresh = SourceItems.of(spec, cached_parts=1)  # holds only the last shard after counting
    write_shard(tmp_path / "00002.tar", {"2000": (photos[0].read_bytes(), "only one now")})
    with pytest.raises(
        SourceError, match=r"00002\.tar' changed while it was in use: it listed 4 images, now 1"
    ):
        fresh[5]


def test_unit_entries_name_shard_slices_that_resolve_to_the_items(photo_dir: Path, tmp_path: Path) -> None:
    photos = sorted(photo_dir.rglob("*.jpg"))
    for number, size in enumerate([3, 4]):
        samples = {f"{number}{i:03d}": (photos[i].read_bytes(), f"c{i}") for i in range(size)}
        write_shard(tmp_path / f"{number:05d}.tar", samples)
    items = SourceItems.of(_spec("webdataset", tmp_path / "{00000..00001}.tar"))
    entries = items.unit_entries(1, 6)
    assert [(e.start, e.stop, e.count) for e in entries if isinstance(e, PartSlice)] == [(1, 3, 3), (0, 3, 4)]
    shipped = pickle.loads(pickle.dumps(entries))  # what a remote worker receives
    assert len(pickle.dumps(entries)) < 1000
    assert [item.key for item in PartLists().resolve(shipped)] == [item.key for item in items[1:6]]

    single = SourceItems.of(_spec("folder", photo_dir))  # one part: already listed here, items are shipped
    assert single.unit_entries(0, 3) == single[0:3]

    write_shard(tmp_path / "00001.tar", {"1000": (photos[0].read_bytes(), "only one now")})
    with pytest.raises(SourceError, match=r"00001\.tar' changed while it was in use: it listed 4 images"):
        PartLists().resolve(shipped)


def test_source_items_list_each_part_once_when_read_in_order() -> None:
    listed: list[str] = []

    def part(name: str, size: int) -> list[Item]:
        listed.append(name)
        return [Item(f"{name}/{i}", None, bytes) for i in range(size)]

    sizes = {"a": 5, "b": 3, "c": 4}
    items = SourceItems(
        [(name, functools.partial(part, name, size)) for name, size in sizes.items()], cached_parts=1
    )
    assert listed == ["a", "b", "c"]  # counted once
    units = [items[0:4], items[4:8], items[8:12]]  # as an engine reads them
    assert [item.key for unit in units for item in unit] == [
        f"{n}/{i}" for n, size in sizes.items() for i in range(size)
    ]
    assert listed == ["a", "b", "c", "a", "b", "c"]  # then listed once more each, in order


def test_expand_braces() -> None:
    assert expand_braces("s/{008..011}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar", "s/011.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    with pytest.raises(SourceError, match="unbalanced"):
        expand_braces("s/{00..01.tar")


def test_coco_labels_from_largest_area_and_captions(photo_dir: Path, tmp_path: Path) -> None:
    images_dir = tmp_path / "val"
    for name in ("chelsea", "coffee", "rocket"):
        (images_dir).mkdir(exist_ok=True)
        (images_dir / f"{name}.jpg").write_bytes(next(photo_dir.rglob(f"{name}.jpg")).read_bytes())
    images = [{"id": i, "file_name": f"{name}.jpg"} for i, name in enumerate(("rocket", "chelsea", "coffee"))]
    instances = {
        "images": images,
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "cup"}, {"id": 3, "name": "dining table"}],
        "annotations": [
            {"image_id": 1, "category_id": 1, "area": 5000.0},
            {"image_id": 2, "category_id": 2, "area": 300.0},  # two cups: 600 in total
            {"image_id": 2, "category_id": 2, "area": 300.0},
            {"image_id": 2, "category_id": 3, "area": 500.0},  # one larger table
        ],
    }
    captions = {"images": images, "annotations": [{"image_id": 1, "caption": "a cat on a sofa"}]}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    spec = infer_source_spec(
        str(images_dir), annotations=[str(tmp_path / "instances.json"), str(tmp_path / "captions.json")]
    )
    assert spec.type == "coco"
    items = list(iter_items(spec))
    assert [item.key for item in items] == ["chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    assert [item.label for item in items] == ["cat", "cup", None]
    assert items[0].captions == ("a cat on a sofa",)

    (tmp_path / "broken.json").write_text(json.dumps({"images": [{"file_name": "x.jpg"}]}))
    with pytest.raises(SourceError, match="malformed COCO"):
        list(iter_items(_spec("coco", images_dir, annotations=[str(tmp_path / "broken.json")])))
    with pytest.raises(SourceError, match="needs annotation files"):
        list(iter_items(_spec("coco", images_dir)))


def test_missing_and_unknown_sources(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        list(iter_items(_spec("folder", tmp_path / "nope")))
    with pytest.raises(SourceError, match="no images"):
        list(iter_items(_spec("folder", tmp_path)))
    with pytest.raises(SourceError, match="does not exist"):
        list(iter_items(_spec("files", tmp_path / "nope.txt")))
    (tmp_path / "data.bin").write_bytes(b"x")
    with pytest.raises(SourceError, match="--source-type"):
        infer_source_spec(str(tmp_path / "data.bin"))
    with pytest.raises(SourceError, match="does not exist"):
        infer_source_spec(str(tmp_path / "missing"))
