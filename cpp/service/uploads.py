"""Saving uploaded images and zip archives into a job folder, within byte, file-count and pixel caps.

Files are written as their multipart parts arrive (:class:`UploadWriter`): images straight into the
upload folder, zips beside it and then unpacked. Zip archives are checked before anything is unpacked:
entry names may not escape the folder (zip-slip), declared sizes must fit the byte budget and each
entry's compression ratio must be plausible; extraction then streams with a hard limit, so an archive
that lies about its sizes is stopped (zip-bomb). Names must fit the file system (components of at most
255 bytes, paths of at most 1024) and may not clash (the same name twice, or a name that is both a file
and a folder); anything the file system still refuses is answered as a problem naming the file.

Uploads are written into a staging folder, ``data_dir/uploads-tmp/<job id>/``, locked with ``flock``
while its request runs, and moved to ``jobs/<job id>/`` before the job row is created.
:func:`remove_orphans` clears what a killed process left: unlocked staging folders and job folders
without a row.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import lzma
import os
import re
import shutil
import stat
import time
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

from PIL import Image, UnidentifiedImageError

from cpp.logging import get_logger
from cpp.service.problems import ApiProblem
from cpp.service.worker import ASSIGN_DIR
from cpp.sources import IMAGE_EXTENSIONS

log = get_logger("service")

_CHUNK = 1024 * 1024
MAX_NAME_BYTES = 255  # one path component, UTF-8 encoded (the limit of common Linux file systems)
MAX_PATH_BYTES = 1024  # a whole path relative to the upload folder, UTF-8 encoded
STAGING_DIR = "uploads-tmp"
_LOCK_NAME = ".lock"
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_NEW_STAGING_S = 60.0  # a staging folder is renamed into its final name this fast after mkdir
_CLASH_ERRNOS = frozenset({errno.EEXIST, errno.ENOTDIR, errno.EISDIR})
_NAME_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL})
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_ZIP_READ_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,  # compression methods zipfile lacks (deflate64, ...)
    RuntimeError,  # encrypted entries
    EOFError,
    OSError,
    ValueError,
)


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int
    max_files: int
    max_pixels: int
    max_zip_ratio: float


def _bad(kind: str, title: str, detail: str, status: int = 422) -> ApiProblem:
    return ApiProblem(status, kind, title, detail)


def _too_large(detail: str) -> ApiProblem:
    return _bad("upload-too-large", "Upload too large", detail, 413)


def _duplicate(detail: str) -> ApiProblem:
    return _bad("duplicate-file", "Duplicate file name", detail)


def _bad_name(detail: str) -> ApiProblem:
    return _bad("bad-file-name", "File name not usable", detail)


def _short(name: str, keep: int = 60) -> str:
    """``name`` quoted, cut to ``keep`` characters for a one-line detail."""
    return repr(name) if len(name) <= keep else repr(name[:keep]) + f"... ({len(name)} characters)"


@contextmanager
def _filesystem(where: str, name: str) -> Iterator[None]:
    """Turn the file system's refusals while writing ``name`` into problems naming it."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _CLASH_ERRNOS:
            raise _duplicate(
                f"{where}: {_short(name)} clashes with a file or folder already written "
                f"({os.strerror(exc.errno)})"
            ) from exc
        if exc.errno in _NAME_ERRNOS:
            raise _bad_name(
                f"{where}: the server's file system refuses the name {_short(name)} "
                f"({os.strerror(exc.errno)})"
            ) from exc
        if exc.errno in _FULL_ERRNOS:
            raise _bad(
                "insufficient-storage",
                "Insufficient Storage",
                f"{where}: no space left on the server for {_short(name)}; try again later",
                507,
            ) from exc
        raise


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


class _Names:
    """The relative paths an upload writes: refuses names too long for the file system, the same name
    twice, and a name used both as a file and as a folder."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.folders: dict[str, str] = {}  # folder -> the first file in it

    def claim(self, parts: tuple[str, ...], where: str) -> None:
        path = "/".join(parts)
        for part in parts:
            size = len(part.encode())
            if size > MAX_NAME_BYTES:
                raise _bad_name(
                    f"{where}: {_short(part)} is {size} bytes in UTF-8; "
                    f"file and folder names may have at most {MAX_NAME_BYTES}"
                )
        size = len(path.encode())
        if size > MAX_PATH_BYTES:
            raise _bad_name(
                f"{where}: {_short(path)} is {size} bytes in UTF-8; paths may have at most {MAX_PATH_BYTES}"
            )
        if path in self.files:
            raise _duplicate(f"{where}: {path!r} appears twice")
        if path in self.folders:
            raise _duplicate(f"{where}: {path!r} is a file and also the folder of {self.folders[path]!r}")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts))]
        for prefix in prefixes:
            if prefix in self.files:
                raise _duplicate(f"{where}: {path!r} needs a folder {prefix!r}, which is also a file")
        self.files.add(path)
        for prefix in prefixes:
            self.folders.setdefault(prefix, path)


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


def _target(dest: Path, parts: tuple[str, ...], where: str) -> Path:
    """The path of a new file ``parts`` under ``dest``, with its folders made (one at a time, so that
    nothing is recreated under a folder removed meanwhile)."""
    target = dest.joinpath(*parts)
    if not target.resolve().is_relative_to(dest.resolve()):
        raise _bad("unsafe-archive", "Unsafe file name", f"{where}: {'/'.join(parts)!r} leaves the folder")
    with _filesystem(where, "/".join(parts)):
        for i in range(1, len(parts)):
            dest.joinpath(*parts[:i]).mkdir(exist_ok=True)
    return target


def _write_entry(
    chunks: Iterable[bytes], target: Path, archive: str, name: str, budget: _Budget, limit: int
) -> None:
    """Stream an archive entry into a new file; stop past ``limit`` bytes (an entry larger than declared)."""
    written = 0
    with _filesystem(archive, name), open(target, "xb") as out:
        for chunk in chunks:
            written += len(chunk)
            if written > limit:
                raise _bad(
                    "unsafe-archive",
                    "Unsafe archive",
                    f"{archive}:{name}: entry is larger than its declared size",
                )
            budget.add_bytes(chunk)
            out.write(chunk)


def _entry_chunks(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> Iterator[bytes]:
    try:
        with archive.open(info) as src:
            while chunk := src.read(_CHUNK):
                yield chunk
    except _ZIP_READ_ERRORS as exc:  # corrupt, encrypted or unsupported entry
        raise _bad("bad-archive", "Unreadable archive entry", f"{where}: {exc}") from exc


def _extract_zip(path: Path, filename: str, dest: Path, budget: _Budget, names: _Names) -> None:
    limits = budget.limits
    try:
        archive = zipfile.ZipFile(path)
    except _ZIP_READ_ERRORS as exc:
        raise _bad("bad-archive", "Not a readable zip archive", f"{filename}: {exc}") from exc
    with archive:
        entries = []
        declared = 0
        for info in archive.infolist():
            where = f"{filename}:{info.filename}"
            parts = _safe_parts(info.filename, filename)
            if info.is_dir() or stat.S_ISLNK(info.external_attr >> 16) or not _wanted(parts):
                continue
            if info.file_size > limits.max_zip_ratio * max(info.compress_size, 1):
                raise _bad(
                    "unsafe-archive",
                    "Unsafe archive",
                    f"{where}: compression ratio over {limits.max_zip_ratio:g} (CPP_MAX_ZIP_RATIO)",
                )
            names.claim(parts, filename)
            declared += info.file_size
            entries.append((info, parts, where))
        if budget.bytes + declared > limits.max_bytes:
            raise _too_large(
                f"{filename}: unpacks to {declared} bytes, over {limits.max_bytes} (CPP_MAX_UPLOAD_BYTES)"
            )
        if budget.files + len(entries) > limits.max_files:
            raise _too_large(f"{filename}: more than {limits.max_files} images (CPP_MAX_UPLOAD_FILES)")
        for info, parts, where in entries:
            name = "/".join(parts)
            target = _target(dest, parts, filename)
            budget.add_file(name)
            _write_entry(_entry_chunks(archive, info, where), target, filename, name, budget, info.file_size)
            _check_image(target, where, limits)


class UploadWriter:
    """Writes an upload's files as their parts arrive: images straight into ``folder/upload``, zip
    archives into ``folder`` and then unpacked into ``folder/upload``.

    Call :meth:`begin`, :meth:`write` and :meth:`end` for each file, then :meth:`finish`; from one thread
    at a time. Problems are raised as :class:`ApiProblem`; the caller removes ``folder``.
    """

    def __init__(self, folder: Path, limits: UploadLimits) -> None:
        self.dest = folder / "upload"
        self.parts = 0
        self._scratch = folder
        self._budget = _Budget(limits)
        self._names = _Names()
        self._filename = ""
        self._path: Path | None = None
        self._zip = False
        self._out: IO[bytes] | None = None

    def begin(self, filename: str) -> None:
        """Start the file the client calls ``filename`` (an image, or a zip of images)."""
        self.parts += 1
        name_parts = _safe_parts(filename, "upload")
        if not name_parts:
            raise _bad("bad-upload", "File without a name", "every uploaded file needs a file name")
        name = name_parts[-1]
        self._filename, self._zip = filename, name.lower().endswith(".zip")
        if self._zip:
            self._budget.digest.update(b"\x00zip\x00" + filename.encode())
            self._path = self._scratch / f"part-{self.parts}.zip"
        else:
            if not _wanted((name,)):
                raise _bad(
                    "bad-upload",
                    "Unsupported file",
                    f"{filename!r}: upload images ({', '.join(sorted(IMAGE_EXTENSIONS))}) or .zip archives",
                )
            self._names.claim((name,), "upload")
            self._path = _target(self.dest, (name,), "upload")
            self._budget.add_file(name)
        with _filesystem("upload", name):
            self._out = open(self._path, "xb")  # noqa: SIM115 (open across write() calls; end() closes)

    def write(self, data: bytes) -> None:
        assert self._out is not None, "write() outside begin() and end()"
        if not self._zip:  # a zip's own bytes are bounded by the request size; its entries are counted
            self._budget.add_bytes(data)
        with _filesystem("upload", self._filename):
            self._out.write(data)

    def end(self) -> None:
        """The file is complete: check the image, or unpack the zip (and remove it)."""
        assert self._out is not None and self._path is not None, "end() without begin()"
        with _filesystem("upload", self._filename):
            self._out.close()
        self._out = None
        if self._zip:
            _extract_zip(self._path, self._filename, self.dest, self._budget, self._names)
            self._path.unlink()
        else:
            _check_image(self._path, self._filename, self._budget.limits)

    def close(self) -> None:
        """Close the file being written, if any (after a problem; the caller removes the folder)."""
        if self._out is not None:
            self._out.close()
            self._out = None

    def finish(self, salt: bytes) -> tuple[int, str]:
        """The number of images and a digest of names, contents and ``salt`` (the job options), used for
        ``Idempotency-Key`` checks."""
        assert self._out is None, "finish() inside a file"
        if self._budget.files == 0:
            raise _bad("bad-upload", "No images", "the upload holds no images (field 'files')")
        self._budget.digest.update(b"\x00options\x00" + salt)
        return self._budget.files, self._budget.digest.hexdigest()


class StagedUpload:
    """One upload's staging folder, ``root/<job id>/``, with an ``flock`` held on its ``.lock`` file
    until it is published or discarded. The kernel drops the lock when the process dies, which is how
    :func:`remove_orphans` tells a killed upload from one in progress in another process.

    The folder is made under a hidden name and renamed once locked, so it is never seen unlocked.
    """

    def __init__(self, root: Path, job_id: str) -> None:
        root.mkdir(exist_ok=True)
        fresh = root / f".{job_id}.new"
        fresh.mkdir()
        try:
            self._lock: IO[bytes] | None = open(fresh / _LOCK_NAME, "xb")  # noqa: SIM115 (held until publish)
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            (fresh / "upload").mkdir()
            self.folder = root / job_id
            fresh.rename(self.folder)
        except BaseException:
            shutil.rmtree(fresh, ignore_errors=True)
            raise

    def publish(self, job_dir: Path) -> None:
        """Move the folder to ``job_dir`` (fresh mtime: the age :func:`remove_orphans` goes by)."""
        os.utime(self.folder)
        self.folder.rename(job_dir)
        (job_dir / _LOCK_NAME).unlink()
        self._release()

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _abandoned(folder: Path) -> bool:
    """Whether no live process holds ``folder``'s lock."""
    try:
        with open(folder / _LOCK_NAME, "r+b") as lock:  # writable: NFS emulates flock with write locks
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except FileNotFoundError:
        return True  # not made by StagedUpload, or its lock already removed by another sweep
    except BlockingIOError:
        return False
    return True


def remove_orphans(
    staging_root: Path,
    jobs_dir: Path,
    job_exists: Callable[[str], bool],
    job_grace_s: float,
    assignment_exists: Callable[[str], bool] | None = None,
) -> list[Path]:
    """Remove what killed processes left behind; returns the folders removed.

    - a staging folder whose lock no process holds (an upload killed midway), and a hidden new one
      older than a minute (killed between ``mkdir`` and ``rename``);
    - a job folder (``jobs/<32 hex>``) without a cluster job row (``job_exists``), last modified over
      ``job_grace_s`` seconds ago (0 when this process is the only one using the store; with a shared
      store another process may have just published an upload and not yet inserted its row);
    - with ``assignment_exists``, likewise an assignment job's folder (``jobs/<id>/assign/<32 hex>``) in a
      job folder that is kept, without an assignment job row.
    """
    removed: list[Path] = []
    now = time.time()
    if staging_root.is_dir():
        for folder in sorted(staging_root.iterdir()):
            if folder.name.startswith("."):
                orphaned = now - folder.lstat().st_mtime > _NEW_STAGING_S
            else:
                orphaned = _abandoned(folder)
            if orphaned:
                _remove(folder, removed)
    if jobs_dir.is_dir():
        for folder in sorted(jobs_dir.iterdir()):
            if not _JOB_ID.match(folder.name):
                continue
            if now - folder.lstat().st_mtime > job_grace_s and not job_exists(folder.name):
                _remove(folder, removed)
            elif assignment_exists is not None:
                _remove_orphaned_in(folder / ASSIGN_DIR, assignment_exists, now - job_grace_s, removed)
    return removed


def _remove_orphaned_in(
    parent: Path, exists: Callable[[str], bool], older_than: float, removed: list[Path]
) -> None:
    """Remove the job folders in ``parent`` last modified before ``older_than`` whose job does not exist."""
    try:
        folders = sorted(parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return
    for folder in folders:
        if _JOB_ID.match(folder.name) and folder.lstat().st_mtime < older_than and not exists(folder.name):
            _remove(folder, removed)


def _remove(folder: Path, removed: list[Path]) -> None:
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:  # removed meanwhile by another process's sweep
        return
    except OSError as exc:
        log.warning("could not remove the orphaned folder %s: %s", folder, exc)
        return
    removed.append(folder)
