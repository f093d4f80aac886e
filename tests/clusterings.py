"""Synthetic clustering artifacts for the curation, export, gallery and UI tests (and bench_gallery.py).

:func:`make_clustering` writes what ``cpp cluster`` leaves in a work directory — a feature store, a readout,
revision 0 and the result — for ``k`` well-separated clusters of random unit features, with a small PNG on
disk (or in tar shards) per member, coloured by cluster, without running an encoder.
"""

from __future__ import annotations

import colorsys
import io
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from cpp import clustering
from cpp.clustering import Clustering
from cpp.knn import normalize_rows
from cpp.options import ClusterOptions, SourceSpec
from cpp.readout import cluster_bases
from cpp.result import (
    Assignment,
    Cluster,
    ClusterResult,
    Counts,
    KSelection,
    NameScore,
    RunInfo,
    SkippedFile,
)
from cpp.sources import resolved_spec
from cpp.store import StoreWriter

INLINE_MAX = 10_000


def _png(colour: tuple[int, int, int], size: int, shade: int) -> bytes:
    image = Image.new("RGB", (size, size), colour)
    image.paste(tuple(min(255, c + 60) for c in colour), (0, 0, size // 2, size // 2 + shade % (size // 2)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _colour(cluster: int, k: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((cluster / max(k, 1)) % 1.0, 0.65, 0.85)
    return int(r * 255), int(g * 255), int(b * 255)


def make_clustering(
    root: Path,
    *,
    k: int = 4,
    per: int = 10,
    d: int = 16,
    names: list[str] | None = None,
    images: bool = True,
    shards: int = 0,
    image_size: int = 48,
    seed: int = 0,
    work: Path | None = None,
) -> Clustering:
    """A finished clustering in ``work`` (default ``root / "work"``) of ``k * per`` images in ``k`` clusters.

    Images are PNG files in ``root / "images"`` (a folder source), or in ``shards`` tar files (a webdataset
    source), or not written at all (``images=False``: only the paths exist in the store).
    """
    rng = np.random.default_rng(seed)
    n = k * per
    truth = np.repeat(np.arange(k), per)
    centres = normalize_rows(rng.standard_normal((k, d)).astype(np.float32))
    x = normalize_rows(centres[truth] + 0.15 * rng.standard_normal((n, d)).astype(np.float32))
    image_root = root / "images"
    image_root.mkdir(parents=True, exist_ok=True)
    keys, paths = [], []
    if shards:
        source = SourceSpec(type="webdataset", path=str(image_root / f"{{0..{shards - 1}}}.tar"))
        handles = [tarfile.open(image_root / f"{s}.tar", "w") for s in range(shards)]  # noqa: SIM115
        for i in range(n):
            s = i % shards
            member = f"{i:06d}.png"
            keys.append(f"{s}.tar/{i:06d}")
            paths.append(f"{image_root / f'{s}.tar'}/{member}")
            data = _png(_colour(int(truth[i]), k), image_size, i)
            info = tarfile.TarInfo(member)
            info.size = len(data)
            handles[s].addfile(info, io.BytesIO(data))
        for handle in handles:
            handle.close()
        order = sorted(range(n), key=lambda i: (i % shards, i))  # the source's order: shard by shard
    else:
        source = SourceSpec(type="folder", path=str(image_root))
        for i in range(n):
            rel = f"c{truth[i]:04d}/{i:06d}.png"
            keys.append(rel)
            paths.append(str(image_root / rel))
            if images:
                (image_root / rel).parent.mkdir(parents=True, exist_ok=True)
                (image_root / rel).write_bytes(_png(_colour(int(truth[i]), k), image_size, i))
        order = sorted(range(n), key=lambda i: keys[i])
    x, truth = x[order], truth[order]
    keys, paths = [keys[i] for i in order], [paths[i] for i in order]

    work = work or root / "work"
    identity = {"encoder_id": "synthetic", "encoder_weights": None, "source": resolved_spec(source)}
    settings = {"chunk_size": 4096, "dtype": "float32", "dim": d, "max_pixels": 1}
    writer = StoreWriter.open(work / clustering.FEATURES_DIR, identity, settings)
    for start in range(0, n, 4096):
        stop = min(n, start + 4096)
        entries: list[dict[str, object]] = [
            {
                "key": keys[i],
                "path": paths[i],
                "captions": [],
                "label": f"class{truth[i]}",
                "status": "ok",
                "reason": None,
            }
            for i in range(start, stop)
        ]
        writer.write_chunk(x[start:stop], entries)
    writer.finish({"encoder_id": "synthetic", "encoder": {"id": "synthetic"}, "source": identity["source"]})

    labels = truth.astype(np.int64)
    sums = np.zeros((k, d))
    np.add.at(sums, labels, x.astype(np.float64))
    centers = normalize_rows(sums.astype(np.float32))
    bases = cluster_bases(x, labels, k, 2)
    similarity = x @ centers.T
    own = similarity[np.arange(n), labels]
    similarity[np.arange(n), labels] = -np.inf
    confidence = np.clip(own - similarity.max(1), 0, 1).astype(np.float32)
    fit = np.einsum("nd,ndr->nr", x, bases[labels]) ** 2
    fit = fit.sum(1).astype(np.float32)
    names = names or [f"cluster {j}" for j in range(k)]
    clusters = []
    for j in range(k):
        rows = np.flatnonzero(labels == j)
        nearest = rows[np.argsort(-own[rows])[:5]]
        clusters.append(
            Cluster(
                id=j,
                size=len(rows),
                name=names[j],
                score=round(0.2 + 0.6 * ((j * 37) % 100) / 100, 5),
                uncertain=j % 3 == 2,
                alternatives=[NameScore(name=f"{names[j]} alt {a}", score=0.2 - 0.05 * a) for a in (1, 2)],
                representatives=[paths[r] for r in nearest],
            )
        )
    records = [
        {
            "key": keys[i],
            "path": paths[i],
            "cluster": int(labels[i]),
            "confidence": round(float(confidence[i]), 5),
            "label": names[labels[i]],
            "label_score": 0.3,
            "true_label": f"class{truth[i]}",
        }
        for i in range(n)
    ]
    inline = n <= INLINE_MAX
    if not inline:
        clustering.write_assignments(work, iter(records), n)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = ClusterResult(
        run=RunInfo(
            encoder={"id": "synthetic", "dim": d},
            head={"type": "none"},
            k_selection=KSelection(
                method="coding_length",
                k=k,
                candidates=list(range(2, 2 * k + 1)),
                coding_length=[1000.0 + 40.0 * (c - k) ** 2 for c in range(2, 2 * k + 1)],
            ),
            source=resolved_spec(source),
            timings_s={"embed": 1.5, "fit": 2.0, "readout": 0.5, "name": 0.25, "total": 4.25},
            counts=Counts(items=n + 1, embedded=n, skipped=1),
            skipped=[
                SkippedFile(key="broken.png", path=str(image_root / "broken.png"), reason="cannot decode")
            ],
            created_at=created,
            work_dir=str(work.resolve()),
        ),
        clusters=clusters,
        assignments=[Assignment.model_validate(r) for r in records] if inline else None,
        assignments_file=None if inline else clustering.ASSIGNMENTS_FILE,
    )
    return clustering.create(
        work,
        manifest=clustering.Manifest(
            id=clustering.new_id(),
            created_at=created,
            model="synthetic",
            encoder={"id": "synthetic"},
            options=ClusterOptions(model="synthetic").model_dump(mode="json"),
            source=resolved_spec(source),
            space="raw",
            head=None,
            novelty=clustering.calibrate_novelty(fit, 0.05),
            members=n,
        ),
        readout=clustering.ReadoutModel(
            centers=centers, bases=bases, labels=labels, confidence=confidence, fit=fit
        ),
        result=result,
    )
