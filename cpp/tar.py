"""Listing the regular files of an uncompressed tar archive (webdataset shards) with their data offsets.

Plain ustar/GNU headers are scanned directly, about 3x faster than :mod:`tarfile` (which parses every field
of every header); an archive with anything else (pax or GNU long-name headers, sparse files, a bad checksum,
an empty file) is listed by :mod:`tarfile` instead, so the result is always what :mod:`tarfile` gives.
"""

from __future__ import annotations

import contextlib
import tarfile
from typing import BinaryIO, NamedTuple

_BLOCK = 512
_FILE_TYPES = frozenset({b"0", b"\0", b"7"})  # regular, old regular, contiguous
_OTHER_TYPES = frozenset({b"1", b"2", b"3", b"4", b"5", b"6"})  # links, devices, directories, FIFOs: no data
_KNOWN_TYPES = _FILE_TYPES | _OTHER_TYPES


class TarMember(NamedTuple):
    """A regular file in a tar archive: its name and where its bytes are."""

    name: str
    offset: int
    size: int


class _Unusual(Exception):
    """A header the direct scan leaves to :mod:`tarfile`."""


def tar_members(source: str | BinaryIO) -> list[TarMember]:
    """The regular files of an uncompressed tar archive (a path, or a seekable binary file), in archive order.

    Raises :class:`tarfile.TarError` or :class:`OSError` for an unreadable or damaged archive.
    """
    with open(source, "rb") if isinstance(source, str) else contextlib.nullcontext(source) as handle:
        try:
            return _scan(handle)
        except _Unusual:
            handle.seek(0)
            with tarfile.open(fileobj=handle, mode="r:") as archive:
                return [TarMember(m.name, m.offset_data, m.size) for m in archive if m.isfile()]


def _scan(handle: BinaryIO) -> list[TarMember]:
    members: list[TarMember] = []
    offset = 0
    while True:
        handle.seek(offset)
        header = handle.read(_BLOCK)
        if len(header) < _BLOCK:
            if offset == 0:
                raise _Unusual  # empty or truncated archive: tarfile's error
            return members
        if header.count(0) == _BLOCK:  # end-of-archive block
            return members
        kind = header[156:157]
        size_field = header[124:136]
        if kind not in _KNOWN_TYPES or size_field[0] & 0x80:
            raise _Unusual  # extended headers, sparse files, base-256 sizes
        try:
            checksum = int(header[148:156].strip(b"\0 ") or b"0", 8)
            size = int(size_field.strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise _Unusual from None
        if checksum != sum(header) - sum(header[148:156]) + 8 * 0x20:
            raise _Unusual
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
        offset += _BLOCK
        if kind in _FILE_TYPES and not (kind == b"\0" and name.endswith(b"/")):  # "x/": old directory
            members.append(TarMember(name.decode("utf-8", "surrogateescape"), offset, size))
            offset += -(-size // _BLOCK) * _BLOCK
