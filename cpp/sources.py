"""Image sources: folders, file lists, webdataset tar shards and COCO, as a deterministic stream of items.

Each :class:`Item` carries a stable key and a picklable ``load_bytes`` callable, so decoding can run in worker
processes while listing stays cheap. :class:`SourceItems` indexes a source while holding only a few of its
parts (webdataset shards) in memory.

Confinement: listed with ``roots`` (the service's allowed roots), a source reads only files that resolve, with
symbolic links followed, inside one of them, checked when each file is opened, not only when it is listed:
the source's own files (folder, list, annotations, named shards) raise :class:`SourceError`, glob matches
outside are left out, and an image outside is skipped with the reason ``outside allowed roots``.
"""

from __future__ import annotations

import bisect
import csv
import functools
import glob
import io
import itertools
import json
import operator
import os
import re
import stat
import tarfile
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, overload

from cpp.errors import SourceError
from cpp.options import SourceSpec, SourceType
from cpp.tar import TarMember, tar_members

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_LIST_EXTENSIONS = (".txt", ".csv")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


@dataclass(frozen=True)
class Item:
    """One image of a source."""

    key: str  # stable, unique within the source
    path: str | None  # file path, or "shard.tar/member" for display
    load_bytes: Callable[[], bytes]  # picklable (functools.partial of a module-level function)
    captions: tuple[str, ...] = ()
    label: str | None = None  # ground truth, when known


#: A named part of a source (a webdataset shard, or the whole source) and how to list its items in order.
SourcePart = tuple[str, Callable[[], Iterable[Item]]]

#: Folders a source may read from (resolved, absolute); ``None``: anywhere.
Roots = tuple[Path, ...] | None

OUTSIDE_ROOTS = "outside allowed roots"


class OutsideRootsError(PermissionError):
    """A file resolves (symbolic links followed) outside the allowed roots; ``str()`` is the skip reason."""

    def __init__(self, path: str) -> None:
        super().__init__(OUTSIDE_ROOTS)
        self.path = path

    def __str__(self) -> str:
        return OUTSIDE_ROOTS


def read_failure(exc: OSError) -> str:
    """The skip reason recorded for an item whose ``load_bytes`` raised ``exc``."""
    if isinstance(exc, OutsideRootsError):
        return OUTSIDE_ROOTS
    return f"unreadable ({type(exc).__name__}: {exc})"


def confine_roots(roots: Iterable[str | os.PathLike[str]] | None) -> Roots:
    """``roots`` resolved for use as :data:`Roots` (``None`` stays unconfined)."""
    return None if roots is None else tuple(Path(root).resolve() for root in roots)


def inside_roots(path: str | os.PathLike[str], roots: Roots) -> bool:
    """Whether ``path`` resolves (symbolic links followed) inside one of ``roots`` (always, without roots)."""
    if roots is None:
        return True
    resolved = Path(os.path.realpath(path))
    return any(resolved.is_relative_to(root) for root in roots)


def _opened_path(handle: Any, path: str) -> str:
    """The file ``handle`` really opened: its ``/proc/self/fd`` link on Linux, so a link swapped in after a
    check cannot redirect the read; elsewhere the resolved path."""
    try:
        return os.readlink(f"/proc/self/fd/{handle.fileno()}")
    except OSError:
        return os.path.realpath(path)


def open_confined(path: str | os.PathLike[str], roots: Roots) -> BinaryIO:
    """Open the regular file ``path`` for reading; :class:`OutsideRootsError` if it is outside ``roots``.

    The path is checked before opening (nothing outside is opened at all), and the file actually opened is
    checked again after. Non-regular files (FIFOs, devices) are refused without blocking.
    """
    if not inside_roots(path, roots):
        raise OutsideRootsError(str(path))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    if not inside_roots(_opened_path(handle, str(path)), roots):
        handle.close()
        raise OutsideRootsError(str(path))
    return handle


def _open_text(path: str | os.PathLike[str], roots: Roots, **kwargs: Any) -> io.TextIOWrapper:
    """:func:`open_confined` as UTF-8 text."""
    return io.TextIOWrapper(open_confined(path, roots), encoding="utf-8", **kwargs)


def read_file(path: str, roots: Roots = None) -> bytes:
    """Read a whole file (the ``load_bytes`` of file-backed items)."""
    with open_confined(path, roots) as handle:
        data: bytes = handle.read()
    return data


def read_range(path: str, offset: int, size: int, roots: Roots = None) -> bytes:
    """Read ``size`` bytes at ``offset`` (the ``load_bytes`` of tar members)."""
    with open_confined(path, roots) as handle:
        handle.seek(offset)
        data: bytes = handle.read(size)
    if len(data) != size:
        raise OSError(f"{path}: expected {size} bytes at offset {offset}, got {len(data)} (truncated shard?)")
    return data


def _require_inside(path: str | os.PathLike[str], roots: Roots, what: str) -> None:
    if not inside_roots(path, roots):
        raise SourceError(f"{what} {str(path)!r} is {OUTSIDE_ROOTS} (symbolic links are followed)")


def infer_source_spec(
    path: str,
    source_type: SourceType | None = None,
    *,
    labels_from_folders: bool = False,
    annotations: Sequence[str] = (),
) -> SourceSpec:
    """Build a :class:`SourceSpec` for ``path``, inferring the type when not given.

    A directory is a ``folder`` (``coco`` when annotation files are given), ``.txt``/``.csv`` a ``files``
    list, and ``.tar`` files, globs or brace patterns ``webdataset`` shards.
    """
    if source_type is None:
        if annotations:
            source_type = "coco"
        elif _is_pattern(path) or path.endswith(".tar"):
            source_type = "webdataset"
        elif os.path.isdir(path):
            source_type = "folder"
        elif path.lower().endswith(_LIST_EXTENSIONS):
            source_type = "files"
        elif not os.path.exists(path):
            raise SourceError(f"source {path!r} does not exist")
        else:
            raise SourceError(
                f"cannot tell the source type of {path!r}: expected a directory, a .txt/.csv file list or "
                ".tar shards; pass the type explicitly (--source-type folder|files|webdataset|coco)"
            )
    return SourceSpec(
        type=source_type, path=path, labels_from_folders=labels_from_folders, annotations=list(annotations)
    )


def resolved_spec(spec: SourceSpec) -> dict[str, Any]:
    """The spec as JSON with absolute paths: what identifies a source in a feature store."""
    data = spec.model_dump()
    data["path"] = os.path.abspath(spec.path)
    data["annotations"] = [os.path.abspath(a) for a in spec.annotations]
    return data


def iter_items(spec: SourceSpec, roots: Roots = None) -> Iterator[Item]:
    """Yield the items of ``spec`` in a deterministic order; :class:`SourceError` for unusable specs."""
    for _, part in source_parts(spec, roots):
        yield from part()


def source_parts(spec: SourceSpec, roots: Roots = None) -> list[SourcePart]:
    """The source as named parts that list their items in order: one per webdataset shard, else one.

    With ``roots``, everything is read under them only (see the module docstring).
    """
    if spec.type == "folder":
        folder = functools.partial(_iter_folder, Path(spec.path), spec.labels_from_folders, roots)
        return [(spec.path, folder)]
    if spec.type == "files":
        return [(spec.path, functools.partial(_iter_file_list, Path(spec.path), roots))]
    if spec.type == "webdataset":
        return [
            (shard, functools.partial(_iter_shard, shard, roots)) for shard in _shard_paths(spec.path, roots)
        ]
    if spec.type == "coco":
        annotations = [Path(a) for a in spec.annotations]
        return [(spec.path, functools.partial(_iter_coco, Path(spec.path), annotations, roots))]
    raise SourceError(f"unknown source type {spec.type!r}")  # pragma: no cover - pydantic validates


@dataclass(frozen=True)
class PartSlice:
    """Items ``start:stop`` of one source part, named by how to list it rather than by its items.

    Small and picklable (the lister is a ``functools.partial`` of a module-level function), so a remote
    worker can list the part itself; ``count`` is the part's size when it was counted.
    """

    name: str
    lister: Callable[[], Iterable[Item]]
    count: int
    start: int
    stop: int


class PartLists:
    """The item lists of the ``keep`` most recently used source parts, listed on first use. Thread-safe.

    A part whose item count differs from the one it was counted with raises :class:`SourceError`.
    """

    def __init__(self, keep: int = 3) -> None:
        self._keep = max(1, keep)
        self._lists: OrderedDict[str, list[Item]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._lists)

    def items(self, name: str, lister: Callable[[], Iterable[Item]], count: int | None = None) -> list[Item]:
        """All items of the part ``name`` (``count``: the size it must have)."""
        with self._lock:
            items = self._lists.get(name)
            if items is None:
                items = list(lister())
                self._lists[name] = items
                if len(self._lists) > self._keep:
                    self._lists.popitem(last=False)
            else:
                self._lists.move_to_end(name)
        if count is not None and len(items) != count:
            raise SourceError(
                f"{name!r} changed while it was in use: it listed {count} images, now {len(items)}"
            )
        return items

    def resolve(self, entries: Iterable[Item | PartSlice]) -> list[Item]:
        """Items and part slices (see :meth:`SourceItems.unit_entries`) as the items they stand for."""
        out: list[Item] = []
        for entry in entries:
            if isinstance(entry, PartSlice):
                out.extend(self.items(entry.name, entry.lister, entry.count)[entry.start : entry.stop])
            else:
                out.append(entry)
        return out


class SourceItems(Sequence[Item]):
    """The items of a source, indexable, holding only a few parts (webdataset shards) in memory at a time.

    Building it lists every part once to count its items; a part is listed again when an index in it is read,
    and the ``cached_parts`` most recently read parts are kept. A sharded source of millions of images thus
    costs memory per shard, not per image. A part whose count changed since it was counted is an error.
    Thread-safe (an engine's reader thread and the store writer share it).
    """

    def __init__(self, parts: list[SourcePart], *, cached_parts: int = 3) -> None:
        self._parts = parts
        self._lists = PartLists(cached_parts)
        self._starts = [0]
        for name, lister in parts:
            self._starts.append(self._starts[-1] + len(self._lists.items(name, lister)))

    @classmethod
    def of(cls, spec: SourceSpec, *, roots: Roots = None, cached_parts: int = 3) -> SourceItems:
        """List ``spec``, reading under ``roots`` only if given (:class:`SourceError` for unusable specs)."""
        return cls(source_parts(spec, roots), cached_parts=cached_parts)

    def __len__(self) -> int:
        return self._starts[-1]

    @overload
    def __getitem__(self, index: int) -> Item: ...

    @overload
    def __getitem__(self, index: slice) -> list[Item]: ...

    def __getitem__(self, index: int | slice) -> Item | list[Item]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return self._lists.resolve(self.slices(start, stop))
        position = operator.index(index)
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"item index {index} out of range for {len(self)} items")
        part = bisect.bisect_right(self._starts, position) - 1
        name, lister = self._parts[part]
        items = self._lists.items(name, lister, self._starts[part + 1] - self._starts[part])
        return items[position - self._starts[part]]

    def slices(self, start: int, stop: int) -> list[PartSlice]:
        """Items ``start:stop`` (``0 <= start <= stop <= len``) as one slice per part they cover."""
        out: list[PartSlice] = []
        while start < stop:
            part = bisect.bisect_right(self._starts, start) - 1
            offset, end = self._starts[part], min(stop, self._starts[part + 1])
            name, lister = self._parts[part]
            count = self._starts[part + 1] - offset
            out.append(PartSlice(name, lister, count, start - offset, end - offset))
            start = end
        return out

    def unit_entries(self, start: int, stop: int) -> list[Item] | list[PartSlice]:
        """What a remote worker needs for items ``start:stop``: part slices of a sharded source (it lists
        those shards itself), else the items (a source in one part is already listed here)."""
        if len(self._parts) > 1:
            return self.slices(start, stop)
        return self[start:stop]


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------------- folder


def _image_files(root: Path) -> list[str]:
    """Image files under ``root``, recursively (hidden files and folders left out), as sorted POSIX paths
    relative to it. Symbolic links to folders are not followed; links to files are listed (and confined
    when read)."""
    relative: list[str] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        base = Path(directory).relative_to(root)
        relative.extend((base / name).as_posix() for name in files if _is_image_name(name) and name[0] != ".")
    return sorted(relative)


def _iter_folder(root: Path, labels_from_folders: bool, roots: Roots = None) -> Iterator[Item]:
    if not root.is_dir():
        raise SourceError(f"image folder {str(root)!r} does not exist or is not a directory")
    _require_inside(root, roots, "image folder")
    relative = _image_files(Path(os.path.realpath(root)))  # the folder checked, even if a link changes now
    if not relative:
        raise SourceError(
            f"no images under {str(root)!r} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, recursively)"
        )
    for rel in relative:
        path = str(root / rel)
        parent = os.path.dirname(rel)
        label = os.path.basename(parent) if labels_from_folders and parent else None
        yield Item(key=rel, path=path, load_bytes=functools.partial(read_file, path, roots), label=label)


# ------------------------------------------------------------------------------------------- file list


def _iter_file_list(list_path: Path, roots: Roots = None) -> Iterator[Item]:
    if not list_path.is_file():
        raise SourceError(f"file list {str(list_path)!r} does not exist")
    _require_inside(list_path, roots, "file list")
    base = list_path.parent
    read = _read_csv_list if list_path.suffix.lower() == ".csv" else _read_txt_list
    entries = read(list_path, roots)
    if not entries:
        raise SourceError(f"file list {str(list_path)!r} names no files")
    seen: dict[str, int] = {}
    for line, entry, label, caption in entries:
        if entry in seen:
            raise SourceError(f"{list_path}:{line}: {entry!r} is listed twice (first on line {seen[entry]})")
        seen[entry] = line
        path = os.path.normpath(entry if os.path.isabs(entry) else os.path.join(base, entry))
        yield Item(
            key=entry,
            path=path,
            load_bytes=functools.partial(read_file, path, roots),
            captions=(caption,) if caption else (),
            label=label or None,
        )


def _read_txt_list(list_path: Path, roots: Roots) -> list[tuple[int, str, str | None, str | None]]:
    entries: list[tuple[int, str, str | None, str | None]] = []
    with _open_text(list_path, roots) as handle:
        for number, raw in enumerate(handle, start=1):
            entry = raw.strip()
            if entry and not entry.startswith("#"):
                entries.append((number, entry, None, None))
    return entries


def _read_csv_list(list_path: Path, roots: Roots) -> list[tuple[int, str, str | None, str | None]]:
    entries = []
    with _open_text(list_path, roots, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise SourceError(
                f"{list_path}: a CSV file list needs a 'path' column (optional: 'label', 'caption'); "
                f"found columns {reader.fieldnames}"
            )
        for row in reader:
            entry = (row.get("path") or "").strip()
            if entry:
                entries.append((reader.line_num, entry, row.get("label"), row.get("caption")))
    return entries


# ------------------------------------------------------------------------------------------ webdataset


def _is_pattern(path: str) -> bool:
    return any(ch in path for ch in "{}*?[")


@dataclass(frozen=True)
class BraceGroup:
    """One ``{...}`` of a shard pattern: a number range ``{first..last}`` (zero padding kept) or the
    alternatives of ``{a,b}``. Its size and longest option are known without expanding it."""

    text: str  # as written, braces included
    numbers: range | None  # the range's numbers; None for alternatives
    width: int  # zero padding of the range's numbers
    alternatives: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.numbers) if self.numbers is not None else len(self.alternatives)

    def options(self) -> Iterator[str]:
        """The options in order."""
        if self.numbers is None:
            return iter(self.alternatives)
        return (str(number).zfill(self.width) for number in self.numbers)

    def longest(self) -> str:
        """The longest option in bytes."""
        if self.numbers is not None:
            return str(self.numbers[-1]).zfill(self.width)
        return max(self.alternatives, key=lambda option: len(option.encode("utf-8", errors="surrogatepass")))


def _brace_group(body: str, pattern: str) -> BraceGroup:
    numeric = _RANGE.match(body)
    if numeric:
        first, last = numeric.groups()
        if int(first) > int(last):
            raise SourceError(f"empty range {{{body}}} in shard pattern {pattern!r} (start > end)")
        width = len(first) if first.startswith("0") else 0
        return BraceGroup(f"{{{body}}}", range(int(first), int(last) + 1), width, ())
    if "," in body:
        return BraceGroup(f"{{{body}}}", None, 0, tuple(body.split(",")))
    raise SourceError(
        f"bad brace expression {{{body}}} in shard pattern {pattern!r}: use {{000..099}} or {{a,b}}"
    )


def parse_braces(pattern: str) -> list[str | BraceGroup]:
    """Split a shard pattern into its literal text and brace groups, in order; raise :class:`SourceError`
    for a bad group or unbalanced braces."""
    parts: list[str | BraceGroup] = []
    end = 0
    for match in _BRACE.finditer(pattern):
        parts += [pattern[end : match.start()], _brace_group(match.group(1), pattern)]
        end = match.end()
    parts.append(pattern[end:])
    if any(isinstance(part, str) and ("{" in part or "}" in part) for part in parts):
        raise SourceError(f"unbalanced braces in shard pattern {pattern!r}")
    return [part for part in parts if part != ""]


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..099}`` ranges (zero padding kept) and ``{a,b}`` alternatives."""
    choices = [[part] if isinstance(part, str) else list(part.options()) for part in parse_braces(pattern)]
    return ["".join(combination) for combination in itertools.product(*choices)]


def _shard_paths(pattern: str, roots: Roots = None) -> list[str]:
    paths: list[str] = []
    for candidate in expand_braces(pattern):
        if any(ch in candidate for ch in "*?["):
            found = sorted(glob.glob(candidate))
            matched = [path for path in found if inside_roots(path, roots)]
            if not matched:
                outside = f" ({len(found)} outside the allowed roots)" if found else ""
                raise SourceError(f"no shard files match {candidate!r}{outside}")
            paths.extend(matched)
        else:
            _require_inside(candidate, roots, "shard")
            paths.append(candidate)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SourceError(
            f"{len(missing)} of {len(paths)} shard files of {pattern!r} are missing, e.g. {missing[0]!r}"
        )
    return sorted(dict.fromkeys(paths))


def _split_member(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the member path up to the first dot of its file name."""
    directory, base = os.path.split(name)
    stem, dot, extension = base.partition(".")
    return (os.path.join(directory, stem) if directory else stem), (extension.lower() if dot else "")


def _iter_shard(shard: str, roots: Roots = None) -> Iterator[Item]:
    _require_inside(shard, roots, "shard")
    shard_name = os.path.basename(shard)
    images: dict[str, TarMember] = {}
    captions: dict[str, str] = {}
    labels: dict[str, str] = {}
    try:
        with open_confined(shard, roots) as handle:
            for member in tar_members(handle):
                key, extension = _split_member(member.name)
                if "." + extension in IMAGE_EXTENSIONS:
                    images.setdefault(key, member)
                elif extension in ("txt", "cls"):
                    handle.seek(member.offset)
                    text = handle.read(member.size).decode("utf-8", errors="replace").strip()
                    (captions if extension == "txt" else labels)[key] = text
    except (tarfile.TarError, OSError) as exc:
        raise SourceError(f"cannot read shard {shard!r}: {exc}") from exc
    for key in sorted(images):
        member = images[key]
        caption = captions.get(key)
        yield Item(
            key=f"{shard_name}/{key}",
            path=f"{shard}/{member.name}",
            load_bytes=functools.partial(read_range, shard, member.offset, member.size, roots),
            captions=(caption,) if caption else (),
            label=labels.get(key),
        )


# ------------------------------------------------------------------------------------------------ COCO


def _iter_coco(image_root: Path, annotation_files: list[Path], roots: Roots = None) -> Iterator[Item]:
    """The images the annotations list (with their labels and captions), then every other image file in
    ``image_root``, unlabelled, so that no image of the folder is dropped."""
    if not image_root.is_dir():
        raise SourceError(f"COCO image folder {str(image_root)!r} does not exist or is not a directory")
    _require_inside(image_root, roots, "COCO image folder")
    listed_root = Path(os.path.realpath(image_root))
    if not annotation_files:
        raise SourceError(
            "a COCO source needs annotation files (instances and/or captions JSON): --annotations"
        )
    file_names: dict[int, str] = {}
    categories: dict[int, str] = {}
    area: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    captions: dict[int, list[str]] = defaultdict(list)
    for annotation_file in annotation_files:
        _require_inside(annotation_file, roots, "COCO annotation file")
        data = _load_coco_json(annotation_file, roots)
        try:
            for image in data["images"]:
                file_names[int(image["id"])] = str(image["file_name"])
            for category in data.get("categories", []):
                categories[int(category["id"])] = str(category["name"])
            for annotation in data.get("annotations", []):
                image_id = int(annotation["image_id"])
                if "caption" in annotation:
                    captions[image_id].append(str(annotation["caption"]).strip())
                if "category_id" in annotation:
                    area[image_id][int(annotation["category_id"])] += float(annotation.get("area", 0.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(
                f"{annotation_file}: malformed COCO entry ({type(exc).__name__}: {exc}); images need "
                "'id' and 'file_name', categories 'id' and 'name', annotations 'image_id'"
            ) from exc
    entries: dict[str, Item] = {}
    for image_id, file_name in sorted(file_names.items(), key=lambda pair: (pair[1], pair[0])):
        path = str(image_root / file_name)
        label = None
        if area.get(image_id):
            best = max(area[image_id].items(), key=lambda pair: (pair[1], -pair[0]))[0]
            if best not in categories:
                raise SourceError(f"{annotation_files}: annotation uses unknown category_id {best}")
            label = categories[best]
        entries.setdefault(
            os.path.normpath(file_name),
            Item(
                key=file_name,
                path=path,
                load_bytes=functools.partial(read_file, path, roots),
                captions=tuple(captions.get(image_id, ())),
                label=label,
            ),
        )
    for rel in _image_files(listed_root):
        if os.path.normpath(rel) not in entries:
            path = str(image_root / rel)
            entries[rel] = Item(key=rel, path=path, load_bytes=functools.partial(read_file, path, roots))
    for name in sorted(entries):
        yield entries[name]


def _load_coco_json(path: Path, roots: Roots = None) -> dict[str, Any]:
    if not path.is_file():
        raise SourceError(f"COCO annotation file {str(path)!r} does not exist")
    try:
        with _open_text(path, roots) as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"cannot read COCO annotation file {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SourceError(f"{path}: not a COCO annotation file (no 'images' list)")
    for field in ("annotations", "categories"):
        if field in data and not isinstance(data[field], list):
            raise SourceError(f"{path}: COCO field {field!r} must be a list")
    return data
