"""Gallery views (overview paging, sorting, filtering; cluster pages; map; run), thumbnails by row through the
source, and the static site."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from clusterings import make_clustering
from PIL import Image

from cpp import curation, gallery
from cpp.cli import main
from cpp.clustering import Clustering
from cpp.gallery import GalleryError
from cpp.sources import confine_roots
from cpp.thumbnails import SIZE, ThumbnailError, Thumbnails

XSS = "<img src=x onerror=alert(1)></script>"


@pytest.fixture
def cl(tmp_path: Path) -> Clustering:
    return make_clustering(
        tmp_path, k=5, per=8, names=["delta", "alpha", XSS, "Beta", "gamma"], image_size=600
    )


def test_overview_sorts_filters_and_pages(cl: Clustering) -> None:
    curation.move(cl, [0, 1, 2], 1)
    by_size = gallery.overview(cl, limit=2)
    assert [c["size"] for c in by_size["clusters"]] == [11, 8] and by_size["total"] == 5
    names = [c["name"] for c in gallery.overview(cl, sort="name")["clusters"]]
    assert names == sorted(names, key=str.casefold)
    assert gallery.overview(cl, sort="uncertain")["clusters"][0]["uncertain"]
    assert [c["name"] for c in gallery.overview(cl, q="ALP")["clusters"]] == ["alpha"]
    assert gallery.overview(cl, offset=4)["clusters"][0]["id"] in range(5)
    cards = gallery.overview(cl)["clusters"]
    labels = cl.labels()
    assert [len(c["thumbs"]) for c in cards] == [10, 8, 8, 8, 5]  # at most CARD_THUMBS, members only
    assert all(labels[r] == c["id"] for c in cards for r in c["thumbs"])
    with pytest.raises(GalleryError, match="sort must be one of"):
        gallery.overview(cl, sort="colour")


def test_cluster_page_orders_by_confidence_and_marks_low(cl: Clustering) -> None:
    page = gallery.cluster_page(cl, 0, limit=100)
    confidences = [m["confidence"] for m in page["members"]]
    assert confidences == sorted(confidences, reverse=True) and page["total"] == 8
    assert all(m["low"] == (m["confidence"] < page["low_below"]) for m in page["members"])
    all_low = sum(m["low"] for c in range(5) for m in gallery.cluster_page(cl, c)["members"])
    assert all_low == 4  # the least confident tenth of 40
    curation.mark_outliers(cl, [3, 9])
    assert [m["row"] for m in gallery.cluster_page(cl, -1)["members"]] in ([3, 9], [9, 3])
    with pytest.raises(GalleryError, match="cluster 5 does not exist"):
        gallery.cluster_page(cl, 5)


def test_map_is_computed_once_and_run_view(cl: Clustering) -> None:
    first = gallery.map_view(cl)
    assert first["shown"] == 40 and min(first["x"]) == 0 and max(first["y"]) == 1000
    stored = cl.path / gallery.PROJECTION_FILE
    mtime = stored.stat().st_mtime_ns
    assert gallery.map_view(cl)["x"] == first["x"] and stored.stat().st_mtime_ns == mtime
    assert gallery.map_view(cl, points=10)["shown"] == 10
    # clusters are apart on the map: each cluster's points sit nearer their own centre than others'
    xy = np.c_[first["x"], first["y"]].astype(float)
    labels = np.asarray(first["cluster"])
    centres = np.stack([xy[labels == c].mean(0) for c in range(5)])
    assert (np.linalg.norm(xy[:, None] - centres[None], axis=2).argmin(1) == labels).mean() > 0.8
    run = gallery.run_view(cl)
    assert run["skipped_total"] == 1 and run["run"]["k_selection"]["k"] == 5 and run["edits"] == []


def test_thumbnails_are_bounded_cached_and_by_row_only(cl: Clustering, tmp_path: Path) -> None:
    thumbs = Thumbnails(cl, confine_roots([tmp_path / "images"]))
    path = thumbs.path(3)
    assert path.is_relative_to(cl.path / "thumbnails") and max(Image.open(path).size) == SIZE
    mtime = path.stat().st_mtime_ns
    assert thumbs.path(3).stat().st_mtime_ns == mtime  # cached
    with pytest.raises(ThumbnailError, match="not in this clustering"):
        thumbs.path(40)
    elsewhere = Thumbnails(cl, confine_roots([tmp_path / "other"]))
    with pytest.raises(ThumbnailError, match=r"cannot be read|outside"):
        elsewhere.path(5)


def test_thumbnails_from_tar_shards(tmp_path: Path) -> None:
    made = make_clustering(tmp_path, k=2, per=6, shards=3)
    thumbs = Thumbnails(made)
    for row in (0, 5, 11):
        image = Image.open(io.BytesIO(thumbs.path(row).read_bytes()))
        assert image.format == "JPEG"


def test_static_site(cl: Clustering, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site"
    assert main(["gallery", str(cl.path), "--out", str(site), "--members", "5"]) == 0
    assert "5 clusters" in capsys.readouterr().out
    assert (site / "index.html").read_text().startswith('<!doctype html>\n<html data-static="1"')
    assert {p.name for p in (site / "ui").iterdir()} == {"app.js", "style.css"}
    data = (site / "data" / "overview.js").read_text()
    assert "</script>" not in data and "<\\/script>" in data  # a name cannot end the script
    payload = json.loads(re.match(r'cppStatic\("overview",(.*)\);\n$', data, re.S).group(1))  # type: ignore[union-attr]
    assert len(payload["clusters"]) == 5 and XSS in [c["name"] for c in payload["clusters"]]
    page = json.loads((site / "data" / "cluster-0.js").read_text().split(",", 1)[1].rstrip(");\n"))
    assert len(page["members"]) == 5
    wanted = {r for c in payload["clusters"] for r in c["thumbs"]}
    assert wanted <= {int(p.stem) for p in (site / "thumbs").iterdir()}
    assert not (tmp_path / ".site.partial").exists()
    assert main(["gallery", str(cl.path), "--out", str(site)]) == 0  # a gallery is replaced
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["gallery", str(cl.path), "--out", str(tmp_path / "busy")]) == 2
    assert "not a gallery" in capsys.readouterr().err
