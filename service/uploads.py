"""Saving uploaded images and zip archives into a job folder, within byte, file-count and pixel caps.

Zip archives are checked before anything is written: entry names may not escape the folder (zip-slip),
declared sizes must fit the byte budget and each entry's compression ratio must be plausible; extraction
then streams with a hard limit, so an archive that lies about its sizes is stopped (zip-bomb).
"""

from __future__ import annotations

import hashlib
import shutil
import stat
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

from PIL import Image, UnidentifiedImageError

from cpp.sources import IMAGE_EXTENSIONS
from service.problems import ApiProblem

_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int
    max_files: int
    max_pixels: int
    max_zip_ratio: float


@dataclass(frozen=True)
class UploadPart:
    """One uploaded file: its client-side name and an open binary stream."""

    filename: str
    file: IO[bytes]


def _bad(kind: str, title: str, detail: str, status: int = 422) -> ApiProblem:
    return ApiProblem(status, kind, title, detail)


def _too_large(detail: str) -> ApiProblem:
    return _bad("upload-too-large", "Upload too large", detail, 413)


class _Budget:
    """Counts bytes and images written against the limits, and hashes what was stored."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self.bytes = 0
        self.files = 0
        self.digest = hashlib.sha256()

    def add_file(self, name: str) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise _too_large(f"more than {self.limits.max_files} images (CPP_MAX_UPLOAD_FILES)")
        self.digest.update(b"\x00file\x00" + name.encode())

    def add_bytes(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        if self.bytes > self.limits.max_bytes:
            raise _too_large(f"more than {self.limits.max_bytes} bytes of images (CPP_MAX_UPLOAD_BYTES)")
        self.digest.update(chunk)


def _safe_parts(name: str, where: str) -> tuple[str, ...]:
    """Path components of an archive or file name, refusing anything that could leave the folder."""
    if "\\" in name or name.startswith("/") or PureWindowsPath(name).drive:
        raise _bad("unsafe-archive", "Unsafe file name", f"{where}: {name!r} is an absolute or Windows path")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    for part in parts:
        if part == ".." or any(unicodedata.category(ch).startswith("C") for ch in part):
            raise _bad(
                "unsafe-archive", "Unsafe file name", f"{where}: {name!r} has a '..' or control character"
            )
    return parts


def _wanted(parts: tuple[str, ...]) -> bool:
    """Images only; hidden files and macOS resource forks (``__MACOSX``) are not images."""
    return (
        bool(parts)
        and not any(p.startswith(".") or p == "__MACOSX" for p in parts)
        and PurePosixPath(parts[-1]).suffix.lower() in IMAGE_EXTENSIONS
    )


def _check_image(path: Path, name: str, limits: UploadLimits) -> None:
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise _bad("bad-image", "Not a readable image", f"{name}: {exc}") from exc
    if width * height > limits.max_pixels:
        raise _bad(
            "image-too-large",
            "Image too large",
            f"{name}: {width}x{height} pixels is over {limits.max_pixels} (CPP_MAX_IMAGE_PIXELS)",
            413,
        )


def _copy(src: IO[bytes], target: Path, budget: _Budget, limit: int | None = None, name: str = "") -> None:
    """Stream ``src`` into a new file; stop past ``limit`` bytes (an archive entry larger than declared)."""
    written = 0
    with open(target, "xb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if limit is not None and written > limit:
                raise _bad(
                    "unsafe-archive", "Unsafe archive", f"{name}: entry is larger than its declared size"
                )
            budget.add_bytes(chunk)
            out.write(chunk)


def _target(dest: Path, parts: tuple[str, ...], where: str) -> Path:
    target = dest.joinpath(*parts)
    if not target.resolve().is_relative_to(dest.resolve()):
        raise _bad("unsafe-archive", "Unsafe file name", f"{where}: {'/'.join(parts)!r} leaves the folder")
    if target.exists():
        raise _bad("duplicate-file", "Duplicate file name", f"{where}: {'/'.join(parts)!r} appears twice")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _extract_zip(part: UploadPart, dest: Path, budget: _Budget) -> None:
    limits = budget.limits
    try:
        archive = zipfile.ZipFile(part.file)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _bad("bad-archive", "Not a readable zip archive", f"{part.filename}: {exc}") from exc
    with archive:
        entries = []
        declared = 0
        for info in archive.infolist():
            where = f"{part.filename}:{info.filename}"
            parts = _safe_parts(info.filename, part.filename)
            if info.is_dir() or stat.S_ISLNK(info.external_attr >> 16) or not _wanted(parts):
                continue
            if info.file_size > limits.max_zip_ratio * max(info.compress_size, 1):
                raise _bad(
                    "unsafe-archive",
                    "Unsafe archive",
                    f"{where}: compression ratio over {limits.max_zip_ratio:g} (CPP_MAX_ZIP_RATIO)",
                )
            declared += info.file_size
            entries.append((info, parts, where))
        if budget.bytes + declared > limits.max_bytes:
            raise _too_large(
                f"{part.filename}: unpacks to {declared} bytes, "
                f"over {limits.max_bytes} (CPP_MAX_UPLOAD_BYTES)"
            )
        if budget.files + len(entries) > limits.max_files:
            raise _too_large(f"{part.filename}: more than {limits.max_files} images (CPP_MAX_UPLOAD_FILES)")
        for info, parts, where in entries:
            target = _target(dest, parts, part.filename)
            budget.add_file("/".join(parts))
            try:
                with archive.open(info) as src:
                    _copy(src, target, budget, limit=info.file_size, name=where)
            except (zipfile.BadZipFile, RuntimeError, OSError, EOFError) as exc:  # corrupt or encrypted entry
                raise _bad("bad-archive", "Unreadable archive entry", f"{where}: {exc}") from exc
            _check_image(target, where, limits)


def save_upload(parts: list[UploadPart], dest: Path, limits: UploadLimits, salt: bytes) -> tuple[int, str]:
    """Write the images of ``parts`` (images, or zips of images) under ``dest``.

    Returns the number of images and a digest of names, contents and ``salt`` (the job options),
    used for ``Idempotency-Key`` checks. On any problem ``dest`` is removed and an :class:`ApiProblem`
    raised.
    """
    dest.mkdir(parents=True, exist_ok=False)
    budget = _Budget(limits)
    try:
        for part in parts:
            name_parts = _safe_parts(part.filename, "upload")
            if not name_parts:
                raise _bad("bad-upload", "File without a name", "every uploaded file needs a file name")
            if name_parts[-1].lower().endswith(".zip"):
                budget.digest.update(b"\x00zip\x00" + part.filename.encode())
                _extract_zip(part, dest, budget)
                continue
            if not _wanted(name_parts[-1:]):
                raise _bad(
                    "bad-upload",
                    "Unsupported file",
                    f"{part.filename!r}: upload images ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                    "or .zip archives",
                )
            target = _target(dest, name_parts[-1:], "upload")
            budget.add_file(name_parts[-1])
            _copy(part.file, target, budget)
            _check_image(target, part.filename, limits)
        if budget.files == 0:
            raise _bad("bad-upload", "No images", "the upload holds no images (field 'files')")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    budget.digest.update(b"\x00options\x00" + salt)
    return budget.files, budget.digest.hexdigest()
