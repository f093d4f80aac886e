"""Pinned results: the demo and a 301-image run give the same clusters, names and confidences as recorded.

Two seed-0 runs of :func:`cpp.pipeline.run_cluster`, compared with ``tests/data/pinned_*.json``:

- ``demo``: what ``cpp cluster --demo`` clusters (84 photos from :mod:`cpp.demo`, the offline
  ``effnet-lite0-in1k`` encoder; below ``SMALL_N``, so the direct path and classifier-row names);
- ``head``: 301 demo photos (43 views of each subject, another seed) through the tiny random-weight
  open_clip encoder of ``conftest.py``, cifar10 names through its text tower, 3 epochs (above ``SMALL_N``,
  so a trained CRATE head, the head readout and text-tower names).

Recorded: per image its cluster and confidence, per cluster its size, name, score, flag and runner-up names,
and K; numbers rounded to 4 decimals and compared to within :data:`TOLERANCE`. Torch and faiss run on
2 threads here whatever the machine has, since results are only reproducible for one thread count.
Recorded at commit ff67cd7 on CPU; regenerated when the head and the subspace bases became faster (the
same clusters; confidences moved by 1e-4, float rounding).

A change that is meant to alter results regenerates the files in the same commit, saying why in its
message: ``CPP_REGEN_PINNED=1 pytest tests/test_pinned.py`` rewrites them (the tests then skip).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import pytest
import torch

from cpp.demo import make_demo_images
from cpp.options import ClusterOptions
from cpp.pipeline import SMALL_N, run_cluster
from cpp.result import ClusterResult

DATA = Path(__file__).parent / "data"
REGENERATE = os.environ.get("CPP_REGEN_PINNED") == "1"
THREADS = 2
HEAD_VIEWS = 43  # 7 subjects x 43 = 301 images, above SMALL_N
#: One unit of the 4th decimal, and a little, since two values 1e-5 apart can round 1e-4 apart.
TOLERANCE = 1.5e-4
EPOCHS = 3  # warm-up and two more: the automatic 50 take minutes on 2 cores


@pytest.fixture(autouse=True)
def _fixed_threads() -> Iterator[None]:
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(THREADS)
    faiss.omp_set_num_threads(THREADS)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


def summary(result: ClusterResult, image_root: Path) -> dict[str, Any]:
    """What is pinned, JSON-ready: K, the clusters and each image's cluster and confidence."""
    assert result.assignments is not None
    return {
        "k": result.run.k_selection.k,
        "clusters": [
            {
                "size": c.size,
                "name": c.name,
                "score": round(c.score, 4),
                "uncertain": c.uncertain,
                "alternatives": [a.name for a in c.alternatives],
            }
            for c in result.clusters
        ],
        "images": {
            Path(a.path or a.key).relative_to(image_root).as_posix(): [a.cluster, round(a.confidence, 4)]
            for a in result.assignments
        },
    }


def check_pinned(name: str, actual: dict[str, Any]) -> None:
    """Compare ``actual`` with ``tests/data/pinned_<name>.json`` (or rewrite that file when regenerating)."""
    path = DATA / f"pinned_{name}.json"
    if REGENERATE:
        path.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        pytest.skip(f"CPP_REGEN_PINNED=1: rewrote {path.name}")
    expected = json.loads(path.read_text(encoding="utf-8"))
    assert actual["k"] == expected["k"]
    for field in ("size", "name", "uncertain", "alternatives"):
        assert [c[field] for c in actual["clusters"]] == [c[field] for c in expected["clusters"]], field
    scores = [c["score"] for c in expected["clusters"]]
    assert [c["score"] for c in actual["clusters"]] == pytest.approx(scores, abs=TOLERANCE)
    assert actual["images"].keys() == expected["images"].keys()
    moved = {
        image: (actual["images"][image], was)
        for image, was in expected["images"].items()
        if actual["images"][image][0] != was[0] or abs(actual["images"][image][1] - was[1]) > TOLERANCE
    }
    assert not moved, f"{len(moved)} images changed (now, pinned): {dict(list(moved.items())[:5])}"


def test_demo_result_is_pinned(tmp_path: Path) -> None:
    images = tmp_path / "demo-images"
    spec = make_demo_images(images)
    options = ClusterOptions(model="effnet-lite0-in1k", device="cpu")  # what `cpp cluster --demo` asks
    result = run_cluster(spec, options, tmp_path / "work")
    assert result.run.head["type"] == "none"  # the direct path
    check_pinned("demo", summary(result, images))


def test_head_result_is_pinned(tmp_path: Path, tiny_clip_spec: str) -> None:
    images = tmp_path / "images"
    spec = make_demo_images(images, views=HEAD_VIEWS, seed=1)
    options = ClusterOptions(model=tiny_clip_spec, vocabulary=["cifar10"], epochs=EPOCHS, device="cpu")
    result = run_cluster(spec, options, tmp_path / "work")
    assert result.run.counts.embedded == HEAD_VIEWS * 7 > SMALL_N
    assert result.run.head["type"] == "crate"
    check_pinned("head", summary(result, images))
