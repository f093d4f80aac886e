"""Uploads stream to a locked staging folder: bounded memory, clean failures on a lost client, and
start-up removal of what a killed process left (but not of uploads other processes are writing)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_testing import CountingEncoderFactory, FakePipeline, wait_status
from test_service_uploads import BOUNDARY, png

from cpp.service.app import create_app
from cpp.service.settings import Settings
from cpp.service.uploads import STAGING_DIR, StagedUpload, remove_orphans

MiB = 1024 * 1024
SERVER = textwrap.dedent(
    """
    import sys
    import uvicorn
    from service_testing import CountingEncoderFactory, FakePipeline
    from cpp.service.app import create_app
    from cpp.service.settings import Settings

    app = create_app(Settings(), pipeline=FakePipeline(), encoder_factory=CountingEncoderFactory())
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
    """
)


def start_app(settings: Settings) -> TestClient:
    return TestClient(create_app(settings, pipeline=FakePipeline(), encoder_factory=CountingEncoderFactory()))


def file_part_head(name: str) -> bytes:
    return f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n\r\n'.encode()


def call_upload(
    client: TestClient, chunks: list[bytes], declared: int, before_disconnect: Callable[[], None]
) -> tuple[int, bytes]:
    """POST ``chunks`` to the upload route at the ASGI level, then report a client disconnect (as
    uvicorn does when the connection drops); ``before_disconnect`` runs first. Returns status and body."""
    sent: list[dict[str, Any]] = []

    async def run() -> None:
        pending = list(chunks)

        async def receive() -> dict[str, Any]:
            if pending:
                return {"type": "http.request", "body": pending.pop(0), "more_body": True}
            before_disconnect()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/jobs/upload",
            "raw_path": b"/v1/jobs/upload",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"testserver"),
                (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
                (b"content-length", str(declared).encode()),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        await client.app(scope, receive, send)  # type: ignore[arg-type]

    assert client.portal is not None
    client.portal.call(run)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body


@pytest.fixture
def big_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_upload_bytes": 50 * MiB})


def test_parts_stream_to_disk_and_a_lost_client_leaves_nothing(big_settings: Settings) -> None:
    staging = big_settings.data_dir / STAGING_DIR
    seen: list[int] = []

    def written_so_far() -> None:
        seen.extend(p.stat().st_size for p in staging.glob("*/upload/big.png"))

    with start_app(big_settings) as client:
        chunks = [file_part_head("big.png"), *(b"\0" * MiB for _ in range(3))]
        status, body = call_upload(client, chunks, 10 * MiB, written_so_far)
        assert status == 400 and b"disconnected" in body and b"bad-multipart" in body
        assert len(seen) == 1 and seen[0] >= 3 * MiB - 64 * 1024  # on disk before the body ended
        assert list(staging.iterdir()) == [] and list(big_settings.jobs_dir.iterdir()) == []


def orphan_staging(root: Path) -> Path:
    """A staging folder as a killed upload leaves it: an unlocked lock file and part of the images."""
    folder = root / uuid.uuid4().hex
    (folder / "upload").mkdir(parents=True)
    (folder / ".lock").touch()
    (folder / "upload" / "a.png").write_bytes(png())
    return folder


def test_start_up_removes_orphans_and_keeps_jobs(settings: Settings) -> None:
    with start_app(settings) as client:
        response = client.post("/v1/jobs/upload", files=[("files", ("a.png", png()))])
        job_id = response.json()["id"]
        wait_status(client, job_id, "succeeded")
    root = settings.data_dir / STAGING_DIR
    orphans = [orphan_staging(root), settings.jobs_dir / uuid.uuid4().hex]
    (orphans[1] / "upload").mkdir(parents=True)  # moved into place, killed before its row was added
    orphans.append(settings.jobs_dir / job_id / "assign" / uuid.uuid4().hex)  # an assignment without a row
    (orphans[2] / "upload").mkdir(parents=True)
    stale_new = root / f".{uuid.uuid4().hex}.new"
    stale_new.mkdir()
    os.utime(stale_new, (time.time() - 3600, time.time() - 3600))
    fresh_new = root / f".{uuid.uuid4().hex}.new"
    fresh_new.mkdir()  # another process is between mkdir and rename right now
    live = StagedUpload(root, uuid.uuid4().hex)  # an upload in progress (its lock is held)
    other = settings.jobs_dir / "not-a-job"
    other.mkdir()
    try:
        with start_app(settings) as client:
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
        assert not any(p.exists() for p in [*orphans, stale_new])
        assert live.folder.is_dir() and fresh_new.is_dir() and other.is_dir()
        assert (settings.jobs_dir / job_id / "result.json").is_file()
    finally:
        live.discard()


def test_shared_store_keeps_job_folders_younger_than_the_lease(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    young, old, known = (jobs / uuid.uuid4().hex for _ in range(3))
    for folder in (young, old, known):
        folder.mkdir(parents=True)
    for folder in (old, known):
        os.utime(folder, (time.time() - 600, time.time() - 600))
    removed = remove_orphans(tmp_path / STAGING_DIR, jobs, lambda job_id: job_id == known.name, 120.0)
    assert removed == [old]
    assert young.is_dir() and known.is_dir()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_server_killed_midway_through_an_upload_is_cleaned_at_restart(settings: Settings) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path]),
        "CPP_DATA_DIR": str(settings.data_dir),
        "CPP_MODEL": settings.model,
        "CPP_DEVICES": "cpu",
        "CPP_RUN_WORKERS": "false",
        "CPP_MAX_UPLOAD_BYTES": str(50 * MiB),
    }
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], env=env)
    staging = settings.data_dir / STAGING_DIR
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
        with conn:
            image = png((64, 64))
            head = (
                f"POST /v1/jobs/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {20 * MiB}\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
            ).encode()
            conn.sendall(head + file_part_head("a.png") + image + b"\r\n" + file_part_head("b.png"))
            conn.sendall(b"\0" * (2 * MiB))
            while not list(staging.glob("*/upload/a.png")):
                assert time.monotonic() < deadline, "the upload never reached the staging folder"
                time.sleep(0.05)
            # A second process starting now (a shared data folder) must leave the upload alone.
            with start_app(settings):
                pass
            assert list(staging.glob("*/upload/a.png"))
            server.send_signal(signal.SIGKILL)
            server.wait(10)
    finally:
        server.kill()
        server.wait(10)
    assert len(list(staging.iterdir())) == 1  # left behind by the kill
    with start_app(settings):
        pass
    assert list(staging.iterdir()) == [] and list(settings.jobs_dir.iterdir()) == []


def test_staged_upload_is_published_without_its_lock(tmp_path: Path) -> None:
    staged = StagedUpload(tmp_path / STAGING_DIR, "a" * 32)
    (staged.folder / "upload" / "x.png").write_bytes(png())
    staged.publish(tmp_path / "jobs-a")
    assert sorted(p.name for p in (tmp_path / "jobs-a").rglob("*")) == ["upload", "x.png"]
    assert list((tmp_path / STAGING_DIR).iterdir()) == []


def test_the_sweep_removes_assignment_folders_without_a_row(tmp_path: Path) -> None:
    """``jobs/<id>/assign/<aid>`` of a deleted (or never recorded) assignment job goes; a recorded one, a
    young one (another process may be adding its row) and other files stay."""
    jobs = tmp_path / "jobs"
    cluster = jobs / uuid.uuid4().hex
    known, orphan, young = (cluster / "assign" / uuid.uuid4().hex for _ in range(3))
    for folder in (known, orphan, young):
        (folder / "upload").mkdir(parents=True)
    for folder in (cluster, known, orphan):
        os.utime(folder, (time.time() - 600, time.time() - 600))
    (cluster / "assign" / "notes.txt").write_text("not a job")
    removed = remove_orphans(
        tmp_path / STAGING_DIR,
        jobs,
        lambda job_id: job_id == cluster.name,
        120.0,
        assignment_exists=lambda job_id: job_id == known.name,
    )
    assert removed == [orphan]
    assert known.is_dir() and young.is_dir() and (cluster / "assign" / "notes.txt").is_file()
    assert remove_orphans(tmp_path / STAGING_DIR, jobs, lambda job_id: False, 0.0) == [cluster]
