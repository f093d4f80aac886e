"""Uploads: images and zips become a job folder; unsafe archives and oversized uploads are refused."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_testing import assert_problem, wait_status

from cpp.service.settings import Settings


def png(size: tuple[int, int] = (8, 8), color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def zipped(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def upload(client: TestClient, files: list[tuple[str, bytes]], **form: str) -> Any:
    return client.post(
        "/v1/jobs/upload", files=[("files", (name, data)) for name, data in files], data=form or None
    )


def test_images_upload_runs_a_job(client: TestClient, settings: Settings) -> None:
    files = [(f"img{i}.png", png(color=(i * 30, 0, 0))) for i in range(4)]
    response = upload(client, files, options=json.dumps({"clusters": 2, "seed": 3}))
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["options"]["seed"] == 3 and job["source"]["type"] == "folder"
    assert Path(job["source"]["path"]) == (settings.jobs_dir / job["id"] / "upload").resolve()
    wait_status(client, job["id"], "succeeded")
    keys = [a["key"] for a in client.get(f"/v1/jobs/{job['id']}/assignments").json()["items"]]
    assert keys == [f"img{i}.png" for i in range(4)]


def test_zip_upload_keeps_folders(client: TestClient) -> None:
    archive = zipped(
        {
            "cats/a.png": png(),
            "cats/b.png": png(),
            "dogs/c.png": png(),
            "__MACOSX/cats/._a.png": b"junk",
            "notes.txt": b"not an image",
            ".hidden/d.png": png(),
        }
    )
    response = upload(client, [("set.zip", archive), ("extra.png", png())], labels_from_folders="true")
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["source"]["labels_from_folders"] is True
    wait_status(client, job["id"], "succeeded")
    items = client.get(f"/v1/jobs/{job['id']}/assignments").json()["items"]
    assert sorted(a["key"] for a in items) == ["cats/a.png", "cats/b.png", "dogs/c.png", "extra.png"]


def test_upload_idempotency(client: TestClient, settings: Settings) -> None:
    headers = {"Idempotency-Key": "up-1"}
    files = [("a.png", png()), ("b.png", png(color=(1, 2, 3)))]
    first = client.post("/v1/jobs/upload", files=[("files", f) for f in files], headers=headers)
    again = client.post("/v1/jobs/upload", files=[("files", f) for f in files], headers=headers)
    assert (first.status_code, again.status_code) == (202, 200) and first.json()["id"] == again.json()["id"]
    assert [p.name for p in settings.jobs_dir.iterdir()] == [first.json()["id"]]  # the copy was removed
    other = client.post("/v1/jobs/upload", files=[("files", ("a.png", png()))], headers=headers)
    assert_problem(other, 422, "idempotency-key-reused")


@pytest.mark.parametrize(
    "name", ["../evil.png", "a/../../evil.png", "/etc/evil.png", "C:/evil.png", "a\\..\\evil.png"]
)
def test_zip_slip_is_refused(client: TestClient, settings: Settings, name: str) -> None:
    problem = assert_problem(
        upload(client, [("x.zip", zipped({"ok.png": png(), name: png()}))]), 422, "unsafe-archive"
    )
    assert "x.zip" in problem["detail"]
    assert list(settings.jobs_dir.iterdir()) == []  # nothing left behind


def test_zip_bomb_ratio_is_refused(client: TestClient, settings: Settings) -> None:
    bomb = zipped({"bomb.png": b"\0" * 1_500_000})
    assert_problem(upload(client, [("bomb.zip", bomb)]), 422, "unsafe-archive")
    assert list(settings.jobs_dir.iterdir()) == []


def test_zip_declaring_too_much_is_refused(client: TestClient) -> None:
    entries = {f"{i}.png": png(color=(i, i, i)) for i in range(3)}
    stored = zipped(entries, zipfile.ZIP_STORED)
    # Claim 1.9 MB for each stored entry in the central directory: over the 2 MB budget together.
    patched = bytearray(stored)
    start = 0
    while (start := patched.find(b"PK\x01\x02", start)) != -1:
        patched[start + 20 : start + 28] = struct.pack("<II", 1_900_000, 1_900_000)
        start += 4
    problem = assert_problem(upload(client, [("big.zip", bytes(patched))]), 413, "upload-too-large")
    assert "unpacks to" in problem["detail"]


def test_zip_entry_larger_than_declared_is_stopped(client: TestClient) -> None:
    stored = bytearray(zipped({"a.png": png(), "b.png": png()}, zipfile.ZIP_STORED))
    start = stored.find(b"PK\x01\x02")
    stored[start + 24 : start + 28] = struct.pack("<I", 10)  # a.png claims to be 10 bytes
    stored[start + 20 : start + 24] = struct.pack("<I", 10)
    response = upload(client, [("liar.zip", bytes(stored))])
    problem = assert_problem(response, 422)
    assert problem["type"] in ("urn:cpp:problem:unsafe-archive", "urn:cpp:problem:bad-archive")


@pytest.mark.parametrize(
    ("files", "status", "kind"),
    [
        ([("x.zip", b"not a zip")], 422, "bad-archive"),
        ([("a.png", b"not an image")], 422, "bad-image"),
        ([("a.exe", b"MZ")], 422, "bad-upload"),
        ([("huge.png", png((400, 300)))], 413, "image-too-large"),
        ([(f"{i}.png", png()) for i in range(21)], 413, "upload-too-large"),
        ([("a.png", png()), ("a.png", png())], 422, "duplicate-file"),
        ([("empty.zip", zipped({"readme.txt": b"hi"}))], 422, "bad-upload"),
        ([("many.zip", zipped({f"{i}.png": png() for i in range(21)}))], 413, "upload-too-large"),
    ],
)
def test_bad_uploads(client: TestClient, settings: Settings, files: list, status: int, kind: str) -> None:
    assert_problem(upload(client, files), status, kind)
    assert list(settings.jobs_dir.iterdir()) == []


def test_bad_upload_forms(client: TestClient) -> None:
    assert_problem(upload(client, [("a.png", png())], options="{bad json"), 422, "validation")
    problem = assert_problem(upload(client, [("a.png", png())], options='{"clusters": 1}'), 422, "validation")
    assert problem["errors"][0]["loc"][:2] == ["options", "clusters"]
    assert_problem(upload(client, [("a.png", png())], labels_from_folders="maybe"), 422, "validation")
    assert_problem(client.post("/v1/jobs/upload", data={"options": "{}"}), 422, "bad-upload")
    assert_problem(client.post("/v1/jobs/upload", content=b"x", headers={"content-type": "text/plain"}), 422)
    assert_problem(
        upload(client, [("a.png", png())], options='{"model": "elsewhere"}'), 403, "model-not-allowed"
    )


def test_oversized_body_is_refused_before_reading(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs/upload",
        content=b"x" * 3_200_000,
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert_problem(response, 413, "upload-too-large")


BOUNDARY = "test-boundary-7d2c"


def multipart_body(parts: Sequence[tuple[str, str | None, bytes]], close: bool = True) -> bytes:
    """A multipart/form-data body of ``(field, filename or None, data)`` parts, with or without the
    closing boundary."""
    body = bytearray()
    for field, filename, data in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    if close:
        body += f"--{BOUNDARY}--\r\n".encode()
    return bytes(body)


def post_body(client: TestClient, body: bytes, **headers: str) -> Any:
    return client.post(
        "/v1/jobs/upload",
        content=body,
        headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}", **headers},
    )


def assert_nothing_saved(settings: Settings) -> None:
    assert list(settings.jobs_dir.iterdir()) == []
    assert list((settings.data_dir / "uploads-tmp").iterdir()) == []


@pytest.mark.parametrize(
    ("files", "kind", "named"),
    [
        ([("a" * 296 + ".png", png())], "bad-file-name", "300 characters"),
        ([("é" * 126 + ".png", png())], "bad-file-name", "256 bytes"),
        ([("x.zip", zipped({"a" * 296 + ".png": png()}))], "bad-file-name", "300 characters"),
        ([("x.zip", zipped({"/".join(["d" * 250] * 5) + "/a.png": png()}))], "bad-file-name", "1260 bytes"),
        (
            [("x.zip", zipped({"x.png": png(), "x.png/y.png": png()}))],
            "duplicate-file",
            "'x.png/y.png' needs a folder 'x.png', which is also a file",
        ),
        (
            [("x.zip", zipped({"x.png/y.png": png(), "x.png": png()}))],
            "duplicate-file",
            "'x.png' is a file and also the folder of 'x.png/y.png'",
        ),
        (
            [("x.png", png()), ("x.zip", zipped({"x.png/y.png": png()}))],
            "duplicate-file",
            "'x.png/y.png' needs a folder 'x.png'",
        ),
        (
            [("x.zip", zipped({"a/b.png": png()})), ("y.zip", zipped({"a/b.png": png()}))],
            "duplicate-file",
            "twice",
        ),
    ],
)
def test_names_the_file_system_cannot_hold_are_refused(
    client: TestClient, settings: Settings, files: list, kind: str, named: str
) -> None:
    problem = assert_problem(upload(client, files), 422, kind)
    assert named in problem["detail"]
    assert_nothing_saved(settings)


def test_longest_names_are_accepted(client: TestClient) -> None:
    name = "é" * 125 + "a.png"  # 255 bytes in UTF-8
    folders = "/".join(["d" * 250] * 3)
    response = upload(client, [(name, png()), ("x.zip", zipped({f"{folders}/{name[:-5]}b.png": png()}))])
    assert response.status_code == 202, response.text
    keys = {a["key"] for a in wait_assignments(client, response.json()["id"])}
    assert keys == {name, f"{folders}/{name[:-5]}b.png"}


def wait_assignments(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    wait_status(client, job_id, "succeeded")
    items: list[dict[str, Any]] = client.get(f"/v1/jobs/{job_id}/assignments").json()["items"]
    return items


def test_file_system_refusals_become_problems(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cpp.service.uploads.MAX_NAME_BYTES", 10_000)  # let the file system refuse instead
    problem = assert_problem(upload(client, [("b" * 300 + ".png", png())]), 422, "bad-file-name")
    assert "File name too long" in problem["detail"] and "'bbbb" in problem["detail"]
    problem = assert_problem(
        upload(client, [("x.zip", zipped({"c" * 300 + ".png": png()}))]), 422, "bad-file-name"
    )
    assert problem["detail"].startswith("x.zip: ")
    assert_nothing_saved(settings)


def test_truncated_multipart_bodies_are_refused(client: TestClient, settings: Settings) -> None:
    parts = [("files", f"{i}.png", png(color=(i, 0, 0))) for i in range(8)]
    body = multipart_body(parts)
    cut = body.index(b'filename="3.png"') + 200  # inside the 4th part's data
    for truncated in (body[:cut], multipart_body(parts, close=False)):
        problem = assert_problem(post_body(client, truncated), 400, "bad-multipart")
        assert "cut off" in problem["detail"]
        assert_nothing_saved(settings)
    assert post_body(client, body).status_code == 202


def test_bodies_must_match_their_content_length(client: TestClient, settings: Settings) -> None:
    body = multipart_body([("files", "a.png", png())])
    problem = assert_problem(
        post_body(client, body, **{"content-length": str(len(body) + 10)}), 400, "bad-multipart"
    )
    assert f"announced {len(body) + 10}" in problem["detail"]
    problem = assert_problem(
        post_body(client, body, **{"content-length": str(len(body) - 10)}), 400, "bad-multipart"
    )
    assert "longer than its Content-Length" in problem["detail"]
    assert_nothing_saved(settings)


@pytest.mark.parametrize(
    ("parts", "status", "kind", "detail"),
    [
        (
            [("files", "a.png", png()), ("colour", None, b"red")],
            422,
            "validation",
            "unknown form field 'colour'",
        ),
        (
            [("files", "a.png", png()), ("options", None, b"{}"), ("options", None, b"{}")],
            422,
            "validation",
            "twice",
        ),
        ([("files", None, png())], 422, "bad-upload", "needs a filename"),
        (
            [("files", "a.png", png()), ("options", None, b" " * 1_100_000)],
            413,
            "upload-too-large",
            "CPP_MAX_JSON_BYTES",
        ),
    ],
)
def test_bad_form_fields(
    client: TestClient, settings: Settings, parts: list, status: int, kind: str, detail: str
) -> None:
    problem = assert_problem(post_body(client, multipart_body(parts)), status, kind)
    assert detail in problem["detail"]
    assert_nothing_saved(settings)


def test_malformed_multipart_headers(client: TestClient) -> None:
    no_boundary = client.post(
        "/v1/jobs/upload", content=b"x", headers={"content-type": "multipart/form-data"}
    )
    assert "no boundary" in assert_problem(no_boundary, 400, "bad-multipart")["detail"]
    no_disposition = f"--{BOUNDARY}\r\nContent-Type: image/png\r\n\r\nxx\r\n--{BOUNDARY}--\r\n".encode()
    assert (
        "no Content-Disposition"
        in assert_problem(post_body(client, no_disposition), 400, "bad-multipart")["detail"]
    )
    garbage = f"--{BOUNDARY}\r\nno colon here\r\n\r\n".encode()
    assert_problem(post_body(client, garbage), 400, "bad-multipart")


def test_options_may_be_sent_as_a_file(client: TestClient) -> None:
    body = multipart_body([("options", "options.json", b'{"seed": 9}'), ("files", "a.png", png())])
    response = post_body(client, body)
    assert response.status_code == 202, response.text
    assert response.json()["options"]["seed"] == 9


def test_reused_idempotency_key_leaves_no_folder(client: TestClient, settings: Settings) -> None:
    headers = {"Idempotency-Key": "up-2"}
    first = client.post("/v1/jobs/upload", files=[("files", ("a.png", png()))], headers=headers)
    other = client.post("/v1/jobs/upload", files=[("files", ("b.png", png()))], headers=headers)
    assert_problem(other, 422, "idempotency-key-reused")
    assert [p.name for p in settings.jobs_dir.iterdir()] == [first.json()["id"]]


def broken_zips() -> dict[str, bytes]:
    """Zips that zipfile cannot read, each failing in a different way."""
    bad_name = zipped({"é.png": png()}).replace("é".encode(), b"\xff\xfe")  # UTF-8 flag, not UTF-8
    deflated = bytearray(zipped({"a.png": png()}))
    deflated[30 + len("a.png")] = 0xFF  # first deflate block: reserved block type
    deflate64 = bytearray(zipped({"a.png": png()}))
    deflate64[8:10] = struct.pack("<H", 9)  # local header: compression method 9
    central = deflate64.find(b"PK\x01\x02")
    deflate64[central + 10 : central + 12] = struct.pack("<H", 9)
    return {"name": bad_name, "deflate": bytes(deflated), "deflate64": bytes(deflate64)}


@pytest.mark.parametrize("broken", ["name", "deflate", "deflate64"])
def test_unreadable_zips_are_refused(client: TestClient, settings: Settings, broken: str) -> None:
    problem = assert_problem(upload(client, [("x.zip", broken_zips()[broken])]), 422, "bad-archive")
    assert problem["detail"].startswith("x.zip")
    assert_nothing_saved(settings)
