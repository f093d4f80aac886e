"""The tar listing used for webdataset shards gives exactly what tarfile gives, on every header kind."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from cpp import tar
from cpp.tar import TarMember, tar_members


def _reference(path: Path) -> list[TarMember]:
    with tarfile.open(path, "r:") as archive:
        return [TarMember(m.name, m.offset_data, m.size) for m in archive if m.isfile()]


def _write(path: Path, fmt: int, names: list[str]) -> None:
    with tarfile.open(path, "w", format=fmt) as archive:
        directory = tarfile.TarInfo("images")
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)
        for number, name in enumerate(names):
            data = bytes([number]) * (100 + 700 * number)  # sizes across block boundaries
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("images/link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = names[0]
        archive.addfile(link)


SHORT = ["images/000.jpg", "images/000.txt", "images/001.jpg", "empty.txt"]
USTAR_PREFIX = ["deep/" * 25 + "001.jpg"]  # over 100 characters: split into ustar prefix and name
LONG = ["d/" + "x" * 120 + ".jpg"]  # too long for ustar: GNU long-name or pax header
UNICODE = ["images/café.jpg"]  # pax header in the pax format


@pytest.mark.parametrize(
    ("fmt", "names", "direct"),
    [
        (tarfile.GNU_FORMAT, SHORT, True),
        (tarfile.USTAR_FORMAT, SHORT + USTAR_PREFIX, True),
        (tarfile.PAX_FORMAT, SHORT, True),
        (tarfile.GNU_FORMAT, SHORT + LONG, False),
        (tarfile.PAX_FORMAT, SHORT + LONG + UNICODE, False),
    ],
)
def test_members_match_tarfile(
    fmt: int, names: list[str], direct: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "shard.tar"
    _write(path, fmt, names)
    expected = _reference(path)
    assert [member.name for member in expected] == names
    assert tar_members(str(path)) == expected
    with path.open("rb") as handle:  # offsets point at each file's bytes
        for number, member in enumerate(expected):
            handle.seek(member.offset)
            assert handle.read(member.size) == bytes([number]) * (100 + 700 * number)
    if direct:  # the plain layouts never need tarfile
        monkeypatch.setattr(tar.tarfile, "open", None)
        assert tar_members(str(path)) == expected


def test_damaged_and_foreign_files_raise_what_tarfile_raises(tmp_path: Path) -> None:
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    html = tmp_path / "page.tar"
    html.write_bytes(b"<html>403 Forbidden</html>" + bytes(2000))
    for path in (empty, html):
        with pytest.raises(tarfile.ReadError):
            tar_members(str(path))
    with pytest.raises(FileNotFoundError):
        tar_members(str(tmp_path / "missing.tar"))

    good = tmp_path / "good.tar"
    _write(good, tarfile.GNU_FORMAT, SHORT)
    data = bytearray(good.read_bytes())
    data[512 * 3 + 148] ^= 0x01  # a bad checksum in a later header: tarfile stops listing there
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(bytes(data))
    assert tar_members(str(damaged)) == _reference(damaged)
    assert len(_reference(damaged)) < len(SHORT)
