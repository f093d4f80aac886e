"""Thumbnails of a clustering's images, made on the server and cached in the clustering's folder.

An image is addressed by its row in the clustering (0..members-1), never by a path: the row's key and path
come from the clustering's feature store, and the bytes are read through the clustering's own source items
(:func:`cpp.sources.source_parts`: folders, file lists, COCO folders or tar shards; for images added by
``cpp assign --update``, their addition's source), confined to ``roots``
when given (the service's allowed roots and the job's folder). So only images that belong to the clustering
can be read. Thumbnails are JPEGs of at most :data:`SIZE` pixels a side, written atomically to
``<clustering>/thumbnails/<SIZE>/<row>.jpg`` and reused.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from pathlib import Path

from cpp.clustering import Clustering
from cpp.curation import Members, members
from cpp.errors import CppError
from cpp.images import BadImage, decode_image
from cpp.options import SourceSpec
from cpp.sources import Item, Roots, SourcePart, read_failure, source_parts

#: Longest side of a thumbnail, in pixels.
SIZE = 256
THUMBNAILS_DIR = "thumbnails"
#: Largest source image decoded for a thumbnail (width * height).
MAX_PIXELS = 64_000_000
_QUALITY = 82
_PARTS_KEPT = 4


class ThumbnailError(CppError):
    """An image of the clustering cannot be read or shown (the message says which and why)."""


class ImageReader:
    """The bytes of a clustering's images by row, read through its source's items (a few parts cached)."""

    def __init__(self, cl: Clustering, roots: Roots = None) -> None:
        self.clustering = cl
        self.roots = roots
        self.members: Members = members(cl)
        self._parts: dict[int, dict[str, SourcePart]] = {}  # per source: 0 fitted, n the n-th addition
        self._items: OrderedDict[tuple[int, str], dict[str, Item]] = OrderedDict()
        self._lock = threading.Lock()

    def _source_of(self, row: int) -> int:
        for addition in self.clustering.manifest.additions:
            if addition.start <= row < addition.start + addition.rows:
                return addition.number
        return 0

    def _source_parts(self, number: int) -> dict[str, SourcePart]:
        if number not in self._parts:
            manifest = self.clustering.manifest
            raw = manifest.additions[number - 1].source if number else manifest.source
            try:
                spec = SourceSpec.model_validate(raw)
                self._parts[number] = {
                    name: (name, lister) for name, lister in source_parts(spec, self.roots)
                }
            except (CppError, ValueError, OSError) as exc:
                raise ThumbnailError(f"the clustering's source cannot be read: {exc}") from None
        return self._parts[number]

    def _part_of(self, number: int, row: int) -> str:
        parts = self._source_parts(number)
        if len(parts) == 1:
            return next(iter(parts))
        path = self.members.paths[row] or ""
        position = path.find("/", 1)
        while position != -1:  # the shard is the longest listed prefix of "shard.tar/member"
            if path[:position] in parts:
                return path[:position]
            position = path.find("/", position + 1)
        raise ThumbnailError(f"image {row}: its shard is no longer in the source")

    def item(self, row: int) -> Item:
        """The source item of ``row`` (:class:`ThumbnailError` when the source no longer has it)."""
        if not 0 <= row < len(self.members):
            raise ThumbnailError(f"image {row} is not in this clustering (rows 0..{len(self.members) - 1})")
        with self._lock:
            number = self._source_of(row)
            name = self._part_of(number, row)
            items = self._items.get((number, name))
            if items is None:
                try:
                    items = {item.key: item for item in self._source_parts(number)[name][1]()}
                except (CppError, OSError) as exc:
                    raise ThumbnailError(f"image {row}: cannot list its part of the source ({exc})") from None
                self._items[(number, name)] = items
                while len(self._items) > _PARTS_KEPT:
                    self._items.popitem(last=False)
            else:
                self._items.move_to_end((number, name))
        found = items.get(self.members.keys[row])
        if found is None:
            raise ThumbnailError(f"image {row} ({self.members.keys[row]}) is no longer in the source")
        return found

    def read(self, row: int) -> bytes:
        """The image bytes of ``row``."""
        item = self.item(row)
        try:
            return item.load_bytes()
        except OSError as exc:
            raise ThumbnailError(f"image {row} ({item.key}): {read_failure(exc)}") from None


def thumbnail_bytes(data: bytes, size: int = SIZE) -> bytes:
    """A JPEG of the image ``data`` with its longest side at most ``size`` pixels."""
    try:
        image = decode_image(data, max_pixels=MAX_PIXELS, min_size=(size, size))
    except BadImage as exc:
        raise ThumbnailError(f"cannot decode the image: {exc.reason}") from None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=_QUALITY, optimize=True)
    return buffer.getvalue()


class Thumbnails:
    """Cached thumbnails of one clustering (thread-safe; many processes may share the cache folder)."""

    def __init__(self, cl: Clustering, roots: Roots = None, size: int = SIZE) -> None:
        self.reader = ImageReader(cl, roots)
        self.size = size
        self.folder = cl.path / THUMBNAILS_DIR / str(size)

    def path(self, row: int) -> Path:
        """The thumbnail file of ``row``, made now if it is not cached yet."""
        if not 0 <= row < len(self.reader.members):
            raise ThumbnailError(
                f"image {row} is not in this clustering (rows 0..{len(self.reader.members) - 1})"
            )
        target = self.folder / f"{row}.jpg"
        if target.is_file():
            return target
        data = thumbnail_bytes(self.reader.read(row), self.size)
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f".{row}.{os.getpid()}.{threading.get_ident()}.tmp"
        partial.write_bytes(data)
        os.replace(partial, target)
        return target
