"""Uploads: images and zips become a job folder; unsafe archives and oversized uploads are refused."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_testing import assert_problem, wait_status

from service.settings import Settings


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
