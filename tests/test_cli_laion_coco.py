"""``cpp cluster`` end to end on LAION-style webdataset shards and on a COCO set, named by captions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from photos import write_shard

from cpp.cli import main
from cpp.result import ClusterResult

CAPTIONS = {
    "chelsea": "a tabby cat looking up",
    "motorcycle": "a red motorbike in a garage",
    "astronaut": "an astronaut in a space suit",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on the launch pad",
    "hubble": "galaxies in the deep sky",
    "camera": "a man with a film camera",
    "coins": "old coins on a table",
}
# COCO categories for the same photos (instances annotations give each image its largest category)
COCO = {
    "chelsea": "cat",
    "motorcycle": "motorcycle",
    "astronaut": "person",
    "coffee": "cup",
    "rocket": "airplane",
    "hubble": "airplane",
    "camera": "person",
    "coins": "cup",
}


def _photos(photo_dir: Path) -> list[Path]:
    return sorted(photo_dir.rglob("*.jpg"), key=lambda path: path.stem)


def _write_img2dataset_shards(photo_dir: Path, root: Path, shards: int = 3) -> list[str]:
    """Shards as img2dataset writes them (``{shard}{index}.jpg/.txt/.json``), with one corrupt image.

    Returns the captions written.
    """
    samples = [(photo.read_bytes(), CAPTIONS[photo.stem]) for photo in _photos(photo_dir)]
    samples.insert(4, (b"<html>403 Forbidden</html>", "a page that is not an image"))
    root.mkdir(parents=True)
    per_shard = -(-len(samples) // shards)
    for shard in range(shards):
        part = samples[shard * per_shard : (shard + 1) * per_shard]
        keys = [f"{shard:05d}{index:04d}" for index in range(len(part))]
        write_shard(root / f"{shard:05d}.tar", dict(zip(keys, part, strict=True)))
    return [caption for _, caption in samples]


def _cluster(args: list[str], tmp_path: Path, tiny_clip_spec: str) -> ClusterResult:
    out = tmp_path / "result.json"
    common = ["--out", str(out), "--work-dir", str(tmp_path / "work"), "--quiet", "--device", "cpu"]
    assert main(["cluster", *args, *common, "--model", tiny_clip_spec, "--clusters", "3"]) == 0
    return ClusterResult.model_validate_json(out.read_text())


def test_laion_shards_named_from_their_captions(
    photo_dir: Path, tmp_path: Path, tiny_clip_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    captions = _write_img2dataset_shards(photo_dir, tmp_path / "laion")
    pattern = str(tmp_path / "laion" / "{00000..00002}.tar")
    result = _cluster([pattern, "--vocabulary", "captions"], tmp_path, tiny_clip_spec)

    assert result.run.source["type"] == "webdataset"
    assert result.run.counts.model_dump() == {"items": 9, "embedded": 8, "skipped": 1}
    (skipped,) = result.run.skipped
    assert skipped.key == "00001.tar/000010001"
    assert skipped.path is not None and skipped.path.endswith("00001.tar/000010001.jpg")
    assert "not an image" in skipped.reason
    good_captions = set(captions) - {"a page that is not an image"}
    assert result.run.naming["names_by_origin"] == {"captions": 8}
    assert len(result.clusters) == 3
    assert {cluster.name for cluster in result.clusters} <= good_captions
    assert result.assignments is not None
    assert {a.key.split("/")[0] for a in result.assignments} == {"00000.tar", "00001.tar", "00002.tar"}
    assert {a.label for a in result.assignments} <= good_captions
    printed = capsys.readouterr().out
    assert "8 images (1 skipped) in 3 clusters" in printed


def test_coco_images_with_instances_and_captions(
    photo_dir: Path, tmp_path: Path, tiny_clip_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    images_dir = tmp_path / "coco" / "val2017"
    images_dir.mkdir(parents=True)
    categories = sorted(set(COCO.values()))
    images, instances, captions = [], [], []
    for number, photo in enumerate(_photos(photo_dir), start=1):
        file_name = f"{number:012d}.jpg"
        (images_dir / file_name).write_bytes(photo.read_bytes())
        images.append({"id": number, "file_name": file_name, "width": 1, "height": 1})
        category = categories.index(COCO[photo.stem]) + 1
        instances.append({"id": number, "image_id": number, "category_id": category, "area": 100.0})
        captions.append({"id": 100 + number, "image_id": number, "caption": CAPTIONS[photo.stem]})
    annotations = tmp_path / "coco" / "annotations"
    annotations.mkdir()
    category_list = [{"id": i + 1, "name": name} for i, name in enumerate(categories)]
    (annotations / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": instances, "categories": category_list})
    )
    (annotations / "captions_val2017.json").write_text(
        json.dumps({"images": images, "annotations": captions})
    )

    args = [
        str(images_dir),
        "--annotations",
        str(annotations / "captions_val2017.json"),
        str(annotations / "instances_val2017.json"),
        "--vocabulary",
        "coco80",
        "captions",
    ]
    result = _cluster(args, tmp_path, tiny_clip_spec)

    assert result.run.source["type"] == "coco"
    assert result.run.counts.model_dump() == {"items": 8, "embedded": 8, "skipped": 0}
    assert result.run.naming["names_by_origin"] == {"coco80": 80, "captions": 8}
    assert result.assignments is not None
    assert {a.true_label for a in result.assignments} == set(categories)
    assert result.metrics is not None and result.metrics["labelled"] == 8
    assert "vs ground truth: acc" in capsys.readouterr().out
