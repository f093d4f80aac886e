"""Exports of the newest revision: result JSON, CSV, COCO and folders of symlinks; the CLI command."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from clusterings import make_clustering

from cpp import curation, export
from cpp.cli import main
from cpp.clustering import Clustering
from cpp.export import ExportError
from cpp.result import ClusterResult


@pytest.fixture
def cl(tmp_path: Path) -> Clustering:
    made = make_clustering(tmp_path, k=3, per=6, names=["cat", "cat", "a/../b"])
    curation.mark_outliers(made, [0])
    return made


def test_json_has_the_revision_edits_and_every_assignment(cl: Clustering, tmp_path: Path) -> None:
    out = export.export(cl, "json", tmp_path / "r.json")
    result = ClusterResult.model_validate_json(out.read_text())
    assert result.revision == 1 and [e.op for e in result.edits] == ["outlier"]
    assert result.assignments is not None and len(result.assignments) == 18
    assert result.assignments[0].cluster == -1


def test_csv_and_coco(cl: Clustering, tmp_path: Path) -> None:
    rows = list(
        csv.DictReader((tmp_path / "x.csv").open() if export.export(cl, "csv", tmp_path / "x.csv") else [])
    )
    assert len(rows) == 18 and rows[0]["cluster"] == "-1" and rows[0]["name"] == ""
    assert {r["name"] for r in rows[1:]} == {"cat", "a/../b"}
    coco = json.loads(export.export(cl, "coco", tmp_path / "c.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["cat", "a/../b"]  # one category per name
    assert len(coco["images"]) == 18 and len(coco["annotations"]) == 17  # no label for the outlier
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2}


def test_folders_of_symlinks(cl: Clustering, tmp_path: Path) -> None:
    out = tmp_path / "tree"
    assert export.write_folders(cl, out) == 18
    folders = sorted(p.name for p in out.iterdir())
    assert folders == ["0000-cat", "0001-cat", "0002-a_.._b", "outliers"]
    links = list(out.rglob("*.png"))
    assert len(links) == 18 and all(p.is_symlink() and p.resolve().is_file() for p in links)
    assert all(p.resolve().is_relative_to(tmp_path / "images") for p in links)
    with pytest.raises(ExportError, match="not an empty folder"):
        export.write_folders(cl, out)


def test_folders_from_tar_shards_write_the_images(tmp_path: Path) -> None:
    made = make_clustering(tmp_path, k=2, per=4, shards=2)
    out = tmp_path / "tree"
    export.write_folders(made, out)
    files = list(out.rglob("*.png"))
    assert len(files) == 8 and not any(os.path.islink(p) for p in files)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in files)


def test_cli(cl: Clustering, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["export", str(cl.path / "result.json"), "--format", "coco", "--out", str(tmp_path / "o.json")])
        == 0
    )
    assert "revision 1" in capsys.readouterr().out and (tmp_path / "o.json").is_file()
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(cl.path), "--format", "yaml", "--out", "x"]) == 2
    assert "invalid choice: 'yaml'" in capsys.readouterr().err
