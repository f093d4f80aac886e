"""Export the newest revision of a clustering: result JSON, CSV, COCO-style JSON, or folders of symlinks.

- ``json``: the result (``revision`` and ``edits`` included) with every assignment inline;
- ``csv``: one row per image: ``path, key, cluster, name, confidence`` (outliers: cluster -1, no name);
- ``coco``: ``images``, one ``categories`` entry per distinct cluster name, and one image-level
  ``annotations`` entry per clustered image (no boxes; ``score`` is the confidence);
- ``folders``: ``OUT/<id>-<name>/<file>`` per cluster (``OUT/outliers/`` for outliers), symbolic links to the
  image files; images inside tar shards are written out as files, read through the source.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import get_args

from cpp.clustering import OUTLIER, Clustering
from cpp.errors import CppError
from cpp.options import ExportFormat
from cpp.result import Assignment, ClusterResult
from cpp.sources import Roots

FORMATS: tuple[str, ...] = get_args(ExportFormat)
#: The formats that are one file (``folders`` is a directory).
FILE_FORMATS = ("json", "csv", "coco")
MEDIA_TYPES = {"json": "application/json", "csv": "text/csv; charset=utf-8", "coco": "application/json"}
_UNSAFE = re.compile(r"[^\w.\- ]+", re.UNICODE)


class ExportError(CppError):
    """An export cannot be written (unknown format, output in the way)."""


def assignments(cl: Clustering) -> list[Assignment]:
    """Every assignment of the newest revision."""
    page, _ = cl.assignments(offset=0, limit=cl.manifest.members)
    return page


def result_json(cl: Clustering) -> bytes:
    """The newest result with its assignments inline."""
    result = cl.result()
    full = result.model_copy(update={"assignments": assignments(cl), "assignments_file": None})
    return full.model_dump_json(indent=1).encode("utf-8")


def _names(result: ClusterResult) -> dict[int, str]:
    return {c.id: c.name for c in result.clusters}


def csv_bytes(cl: Clustering) -> bytes:
    """``path, key, cluster, name, confidence`` per image."""
    names = _names(cl.result())
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "key", "cluster", "name", "confidence"])
    for a in assignments(cl):
        writer.writerow([a.path or "", a.key, a.cluster, names.get(a.cluster, ""), a.confidence])
    return buffer.getvalue().encode("utf-8")


def coco_document(cl: Clustering) -> dict[str, object]:
    """COCO-style image-level labels: a category per distinct cluster name."""
    result = cl.result()
    categories: dict[str, int] = {}
    for c in result.clusters:
        categories.setdefault(c.name, len(categories) + 1)
    names = _names(result)
    images: list[dict[str, object]] = []
    annotations: list[dict[str, object]] = []
    for i, a in enumerate(assignments(cl)):
        images.append({"id": i + 1, "file_name": a.path or a.key, "cpp_key": a.key})
        if a.cluster != OUTLIER:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": categories[names[a.cluster]],
                    "score": a.confidence,
                    "cpp_cluster": a.cluster,
                }
            )
    return {
        "info": {
            "description": f"cpp clustering {cl.id}, revision {result.revision}",
            "date_created": result.run.created_at,
        },
        "images": images,
        "categories": [{"id": i, "name": name, "supercategory": "cluster"} for name, i in categories.items()],
        "annotations": annotations,
    }


def render(cl: Clustering, fmt: str) -> bytes:
    """The export of ``cl`` in one of :data:`FILE_FORMATS`."""
    if fmt == "json":
        return result_json(cl)
    if fmt == "csv":
        return csv_bytes(cl)
    if fmt == "coco":
        return json.dumps(coco_document(cl), ensure_ascii=False, indent=1).encode("utf-8")
    raise ExportError(f"format {fmt!r} is not a file format; choose one of {', '.join(FILE_FORMATS)}")


def safe_name(text: str, limit: int = 80) -> str:
    """``text`` as one file name: letters, digits, ``._- `` only, never empty, ``.`` or ``..``."""
    cleaned = _UNSAFE.sub("_", text).strip(" .")[:limit]
    return cleaned or "_"


def write_folders(cl: Clustering, out: Path, roots: Roots = None) -> int:
    """Symlink (or, for tar members, write) every image into its cluster's folder under ``out``; returns
    the number of images. ``out`` must not exist or be empty; it is built beside and renamed into place."""
    from cpp.thumbnails import ImageReader, ThumbnailError

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder; choose a new one")
    result = cl.result()
    folders = {c.id: f"{c.id:04d}-{safe_name(c.name)}" for c in result.clusters}
    folders[OUTLIER] = "outliers"
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    reader: ImageReader | None = None
    used: set[str] = set()
    count = 0
    for row, a in enumerate(assignments(cl)):
        folder = partial / folders[a.cluster]
        folder.mkdir(parents=True, exist_ok=True)
        base = safe_name(os.path.basename(a.path or a.key), 120)
        name = base if f"{folder.name}/{base}" not in used else f"{row}-{base}"
        used.add(f"{folder.name}/{name}")
        if a.path and os.path.isfile(a.path):
            os.symlink(os.path.abspath(a.path), folder / name)
        else:
            reader = reader or ImageReader(cl, roots)
            try:
                (folder / name).write_bytes(reader.read(row))
            except ThumbnailError as exc:
                shutil.rmtree(partial, ignore_errors=True)
                raise ExportError(f"cannot export image {a.key}: {exc}") from None
        count += 1
    if out.exists():
        out.rmdir()
    os.replace(partial, out)
    return count


def export(cl: Clustering, fmt: str, out: Path, roots: Roots = None) -> Path:
    """Write the export of ``cl`` in format ``fmt`` to ``out`` (a file, or a folder for ``folders``)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "folders":
        write_folders(cl, out, roots)
        return out
    data = render(cl, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.tmp")
    partial.write_bytes(data)
    os.replace(partial, out)
    return out
