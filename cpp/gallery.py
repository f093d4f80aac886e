"""What the browser shows of a clustering, and the static gallery (``cpp gallery CLUSTERING --out site/``).

The views are plain JSON-ready dicts shared by the service's UI routes and the static site:

- :func:`overview`: one card per cluster (name, size, score, uncertain, 10 thumbnail rows), sorted by size,
  score, uncertainty or name, filtered by name, paged;
- :func:`cluster_page`: a cluster (or the outliers, id -1) with its members by confidence, paged, the
  least confident marked, its alternative names and the run's summary;
- :func:`map_view`: a 2-D projection of the collection (PCA of the features, computed once per clustering
  and stored as ``projection.npy``), at most :data:`MAP_POINTS` points, with each point's cluster;
- :func:`run_view`: encoder, head, fit, timings, skipped files and the coding-length curve of K.

The static site is the same single-page UI (``cpp/service/ui``) reading ``data/*.js`` files instead of the
API, so it opens from ``file://``: the page loads each data file with a ``<script>`` tag. Images are
thumbnails under ``thumbs/``, for every cluster's first :data:`STATIC_MEMBERS` members by confidence.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cpp.clustering import OUTLIER, Clustering
from cpp.curation import Members, members, open_store
from cpp.errors import CppError
from cpp.options import STATIC_MEMBERS
from cpp.sources import Roots

SortKey = Literal["size", "score", "uncertain", "name"]
SORT_KEYS: tuple[str, ...] = ("size", "score", "uncertain", "name")
#: Thumbnails per overview card.
CARD_THUMBS = 10
#: Share of members (lowest readout confidence) marked "low confidence".
LOW_QUANTILE = 0.1
MAP_POINTS = 20_000
#: Map coordinates are integers in 0..MAP_SCALE.
MAP_SCALE = 1000
PROJECTION_FILE = "projection.npy"
#: Skipped files listed by the run view (the count is always given).
SKIPPED_SHOWN = 200
UI_PACKAGE = "cpp.service.ui"
#: The UI's script and style, beside ``index.html`` in ``ui/`` (as the service serves them).
UI_ASSETS = ("app.js", "style.css")
_CACHE_SIZE = 16


class GalleryError(CppError):
    """A view cannot be made with these arguments (unknown cluster, bad sort, output in the way)."""


@dataclass(frozen=True)
class RevisionView:
    """One revision's labels with every cluster's members sorted by confidence (best first)."""

    labels: np.ndarray
    order: np.ndarray  # rows grouped by label (outliers first), by decreasing confidence within a label
    starts: np.ndarray  # order[starts[c + 1] : starts[c + 2]] are cluster c's rows; starts[0:2] outliers
    low: float  # confidence below which a member is marked


_views: OrderedDict[tuple[str, str, int], RevisionView] = OrderedDict()
_views_lock = threading.Lock()


def revision_view(cl: Clustering, revision: int | None = None) -> RevisionView:
    """The :class:`RevisionView` of ``revision`` (default newest), cached per process."""
    number = cl.revision if revision is None else revision
    key = (str(cl.path.resolve()), cl.id, number)
    with _views_lock:
        found = _views.get(key)
        if found is not None:
            _views.move_to_end(key)
            return found
    mem = members(cl)
    labels = cl.labels(number)
    k = len(cl.state(number).clusters)
    order = np.lexsort((-mem.confidence, labels))
    starts = np.searchsorted(labels[order], np.arange(-1, k + 1), side="left")
    low = float(np.quantile(mem.confidence, LOW_QUANTILE)) if len(mem) else 0.0
    found = RevisionView(labels, order, starts, low)
    with _views_lock:
        _views[key] = found
        while len(_views) > _CACHE_SIZE:
            _views.popitem(last=False)
    return found


def cluster_rows(view: RevisionView, cluster: int) -> np.ndarray:
    """Rows of ``cluster`` (or :data:`OUTLIER`) by decreasing confidence."""
    return view.order[view.starts[cluster + 1] : view.starts[cluster + 2]]


def _card_rows(mem: Members, view: RevisionView, cluster: Any, count: int) -> list[int]:
    """The cluster's representatives, then its most confident other members, ``count`` rows in all."""
    rows: list[int] = []
    for shown in cluster.representatives:
        row = mem.row_of(shown)
        if row is not None and view.labels[row] == cluster.id and row not in rows:
            rows.append(row)
    if len(rows) < count:
        seen = set(rows)
        for row in cluster_rows(view, cluster.id)[: count + len(rows)].tolist():
            if row not in seen:
                rows.append(row)
                if len(rows) == count:
                    break
    return rows[:count]


def overview(
    cl: Clustering,
    *,
    sort: str = "size",
    descending: bool | None = None,
    q: str = "",
    offset: int = 0,
    limit: int = 60,
    thumbs: int = CARD_THUMBS,
) -> dict[str, Any]:
    """A page of cluster cards (see the module docstring); ``q`` filters by name (case-insensitive).

    ``descending`` defaults to True for the numbers (size, score, uncertain first) and False for names.
    """
    if sort not in SORT_KEYS:
        raise GalleryError(f"sort must be one of {', '.join(SORT_KEYS)}, got {sort!r}")
    if offset < 0 or limit < 0:
        raise GalleryError("offset and limit must be non-negative")
    state = cl.state()
    view = revision_view(cl, state.revision)
    mem = members(cl)
    needle = q.strip().casefold()
    chosen = [c for c in state.clusters if needle in c.name.casefold()] if needle else list(state.clusters)
    keys = {
        "size": lambda c: (c.size, -c.id),
        "score": lambda c: (c.score, -c.id),
        "uncertain": lambda c: (c.uncertain, -c.score, -c.id),
        "name": lambda c: (c.name.casefold(), c.id),
    }
    descending = sort != "name" if descending is None else descending
    chosen.sort(key=keys[sort], reverse=descending)
    page = chosen[offset : offset + limit]
    return {
        "id": cl.id,
        "revision": state.revision,
        "members": cl.manifest.members,
        "clusters_total": len(state.clusters),
        "outliers": int(view.starts[1] - view.starts[0]),
        "total": len(chosen),
        "offset": offset,
        "limit": limit,
        "sort": sort,
        "descending": descending,
        "q": q,
        "clusters": [
            {
                "id": c.id,
                "name": c.name,
                "size": c.size,
                "score": c.score,
                "uncertain": c.uncertain,
                "thumbs": _card_rows(mem, view, c, thumbs),
            }
            for c in page
        ],
    }


def run_summary(cl: Clustering) -> dict[str, Any]:
    """The few run facts a cluster page shows."""
    run = cl.result().run
    return {
        "encoder": run.encoder.get("id", cl.manifest.model),
        "head": run.head.get("type"),
        "space": cl.manifest.space,
        "k": run.k_selection.k,
        "k_method": run.k_selection.method,
        "created_at": run.created_at,
    }


def cluster_page(cl: Clustering, cluster: int, *, offset: int = 0, limit: int = 60) -> dict[str, Any]:
    """A cluster (``-1``: the outliers) with one page of its members by decreasing confidence."""
    if offset < 0 or limit < 0:
        raise GalleryError("offset and limit must be non-negative")
    state = cl.state()
    if not OUTLIER <= cluster < len(state.clusters):
        raise GalleryError(f"cluster {cluster} does not exist; clusters are 0..{len(state.clusters) - 1}")
    view = revision_view(cl, state.revision)
    mem = members(cl)
    rows = cluster_rows(view, cluster)
    info: dict[str, Any]
    if cluster == OUTLIER:
        info = {"id": OUTLIER, "name": "Outliers", "size": len(rows), "score": 0.0, "uncertain": False}
        info["alternatives"] = []
    else:
        c = state.clusters[cluster]
        info = c.model_dump(include={"id", "name", "size", "score", "uncertain", "alternatives"})
    return {
        "id": cl.id,
        "revision": state.revision,
        "cluster": info,
        "clusters": [{"id": c.id, "name": c.name, "size": c.size} for c in state.clusters],
        "total": len(rows),
        "offset": offset,
        "limit": limit,
        "low_below": round(view.low, 5),
        "members": [
            {
                "row": row,
                "key": mem.keys[row],
                "name": os.path.basename(mem.paths[row] or mem.keys[row]),
                "confidence": round(float(mem.confidence[row]), 4),
                "low": bool(mem.confidence[row] < view.low),
            }
            for row in rows[offset : offset + limit].tolist()
        ],
        "run": run_summary(cl),
    }


def projection(cl: Clustering) -> np.ndarray:
    """``(members, 2)`` float32 PCA coordinates of the unit features, made once and stored."""
    path = cl.path / PROJECTION_FILE
    if path.is_file():
        stored = np.load(path)
        if stored.shape == (cl.manifest.members, 2):
            return stored.astype(np.float32)
    store = open_store(cl)
    d = store.dim
    total = np.zeros(d)
    scatter = np.zeros((d, d))
    n = 0
    for _, block in store.iter_blocks():  # streamed: mean and scatter of the unit rows
        unit = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        total += unit.sum(0)
        scatter += unit.T.astype(np.float64) @ unit
        n += len(unit)
    mean = total / max(n, 1)
    covariance = scatter / max(n, 1) - np.outer(mean, mean)
    _, vectors = np.linalg.eigh(covariance)
    axes = vectors[:, ::-1][:, :2]
    out = np.empty((n, 2), dtype=np.float32)
    for start, block in store.iter_blocks():
        unit = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        out[start : start + len(block)] = (unit - mean) @ axes
    partial = path.with_name(f"{PROJECTION_FILE}.{os.getpid()}.tmp.npy")
    np.save(partial, out)
    os.replace(partial, path)
    return out


def map_view(cl: Clustering, *, points: int = MAP_POINTS) -> dict[str, Any]:
    """Up to ``points`` members (a fixed random sample above that) as integer map coordinates in
    0..:data:`MAP_SCALE`, with their rows and clusters, and the clusters' names and sizes."""
    coords = projection(cl)
    state = cl.state()
    labels = revision_view(cl, state.revision).labels
    n = len(coords)
    rows = np.arange(n) if n <= points else np.sort(np.random.default_rng(0).choice(n, points, replace=False))
    shown = coords[rows]
    low, high = shown.min(0) if n else np.zeros(2), shown.max(0) if n else np.ones(2)
    scaled = np.round((shown - low) / np.maximum(high - low, 1e-12) * MAP_SCALE).astype(np.int64)
    return {
        "id": cl.id,
        "revision": state.revision,
        "members": n,
        "shown": len(rows),
        "x": scaled[:, 0].tolist(),
        "y": scaled[:, 1].tolist(),
        "row": rows.tolist(),
        "cluster": labels[rows].tolist(),
        "clusters": [{"id": c.id, "name": c.name, "size": c.size} for c in state.clusters],
    }


def run_view(cl: Clustering) -> dict[str, Any]:
    """The run's encoder, head, fit, naming, timings, counts, skipped files and the K-selection curve."""
    result = cl.result()
    run = result.run.model_dump(mode="json")
    skipped = run.pop("skipped")
    return {
        "id": cl.id,
        "revision": result.revision,
        "run": run,
        "skipped": skipped[:SKIPPED_SHOWN],
        "skipped_total": len(skipped),
        "metrics": result.metrics,
        "edits": [e.model_dump(mode="json") for e in result.edits],
        "manifest": {"model": cl.manifest.model, "space": cl.manifest.space, "members": cl.manifest.members},
    }


# ------------------------------------------------------------------------------------------ static site


def ui_asset(name: str) -> bytes:
    """A file of the browser UI (``cpp/service/ui``); importing it needs no web framework."""
    return resources.files(UI_PACKAGE).joinpath(name).read_bytes()


def _script(name: str, payload: dict[str, Any]) -> str:
    """A data file of the static site: a call that hands ``payload`` to the page (JSON, ``</`` escaped so
    that no name can end the script)."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    return f"cppStatic({json.dumps(name)},{text});\n"


def write_site(
    cl: Clustering, out: Path, *, roots: Roots = None, per_cluster: int = STATIC_MEMBERS
) -> dict[str, int]:
    """Write the static gallery of ``cl`` to ``out`` (built beside it, then renamed into place; an existing
    gallery there is replaced). Returns counts: clusters, thumbnails, images that could not be shown."""
    from cpp.thumbnails import ThumbnailError, Thumbnails

    if out.exists() and not out.is_dir():
        raise GalleryError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "index.html").is_file():
        raise GalleryError(f"--out {out} is a folder that is not a gallery; choose an empty or new one")
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "data").mkdir(parents=True)
    (partial / "thumbs").mkdir()
    (partial / "ui").mkdir()
    html = ui_asset("index.html").replace(b"<html ", b'<html data-static="1" ', 1)
    (partial / "index.html").write_bytes(html)
    for name in UI_ASSETS:
        (partial / "ui" / name).write_bytes(ui_asset(name))

    card = overview(cl, limit=cl.manifest.members + 1)
    wanted: set[int] = set()
    for c in card["clusters"]:
        wanted.update(c["thumbs"])
    files: dict[str, dict[str, Any]] = {"overview": card, "run": run_view(cl), "map": map_view(cl)}
    for c in [*card["clusters"], {"id": OUTLIER}]:
        page = cluster_page(cl, c["id"], limit=per_cluster)
        if c["id"] == OUTLIER and not page["total"]:
            continue
        wanted.update(m["row"] for m in page["members"])
        files[f"cluster-{c['id']}"] = page
    for name, payload in files.items():
        (partial / "data" / f"{name}.js").write_text(_script(name, payload), encoding="utf-8")

    thumbnails = Thumbnails(cl, roots)
    failed = 0
    for row in sorted(wanted):
        try:
            shutil.copyfile(thumbnails.path(row), partial / "thumbs" / f"{row}.jpg")
        except ThumbnailError:
            failed += 1
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return {"clusters": len(card["clusters"]), "thumbnails": len(wanted) - failed, "failed": failed}
