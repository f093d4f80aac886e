"""End to end: a real ``cpp serve`` process (uvicorn on 127.0.0.1) runs the real pipeline with the offline
encoder on real photos; a SIGKILL mid-job followed by a restart finishes the job with the same result."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

MODEL = "effnet-lite0-in1k"
OPTIONS = {"model": "auto", "clusters": 2, "epochs": 1, "batch_size": 1, "seed": 7}
VIEWS = 4  # each photo as itself, mirrored, and two crops: enough batches to kill the job mid-embedding
IMAGES = 8 * VIEWS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A ``cpp serve`` subprocess and an HTTP client for it."""

    def __init__(self, data_dir: Path, root: Path, log: Path) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "CPP_DATA_DIR": str(data_dir),
            "CPP_ALLOWED_ROOTS": str(root),
            "CPP_MODEL": MODEL,
            "CPP_DEVICES": "cpu",
            "CPP_POLL_INTERVAL_S": "0.2",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "2",
        }
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import sys; from cpp.cli import main; sys.exit(main())",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).parents[2],
            )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server did not start:\n{log.read_text()}")
            time.sleep(0.1)

    def wait(self, job_id: str, *statuses: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (job := self.http.get(f"/v1/jobs/{job_id}").json())["status"] not in statuses:
            assert job["status"] not in {"failed", "cancelled"} - set(statuses), job
            assert time.monotonic() < deadline, f"job stuck: {job}\n{self.log.read_text()}"
            time.sleep(0.02)
        return job

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.http.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()


_PHOTOS = {  # name -> (class folder, scikit-image sample)
    "chelsea": ("animals", "chelsea"),
    "cat": ("animals", "cat"),
    "astronaut": ("people", "astronaut"),
    "camera": ("people", "camera"),
    "coffee": ("objects", "coffee"),
    "rocket": ("objects", "rocket"),
    "hubble": ("space", "hubble_deep_field"),
    "moon": ("space", "moon"),
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 scikit-image photos in 4 class folders, 4 views each, at 128 px: a CPU run takes seconds."""
    import numpy as np
    from skimage import data

    root = tmp_path_factory.mktemp("e2e") / "photos"
    for name, (folder, sample) in _PHOTOS.items():
        array = getattr(data, sample)()
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        image = Image.fromarray(np.ascontiguousarray(array[..., :3]))
        image.thumbnail((128, 128))
        (root / folder).mkdir(parents=True, exist_ok=True)
        w, h = image.size
        views = [
            image,
            image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
            image.crop((0, 0, w * 3 // 4, h * 3 // 4)),
            image.crop((w // 4, h // 4, w, h)),
        ]
        for number, view in enumerate(views):
            view.save(root / folder / f"{name}_{number}.jpg", quality=90)
    return root


def _summary(server: Server, job_id: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    result = server.http.get(f"/v1/jobs/{job_id}/result").json()
    page = server.http.get(f"/v1/jobs/{job_id}/assignments", params={"limit": 100}).json()
    return [(c["size"], c["name"]) for c in result["clusters"]], {
        a["key"]: a["cluster"] for a in page["items"]
    }


@pytest.fixture(scope="module")
def reference(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list, dict]]:
    """Submit the folder to a fresh server, poll to success, and keep the outcome for comparison."""
    base = tmp_path_factory.mktemp("served")
    server = Server(base / "data", photos.parent, base / "server.log")
    try:
        request = {
            "source": {"type": "folder", "path": str(photos), "labels_from_folders": True},
            "options": OPTIONS,
        }
        response = server.http.post("/v1/jobs", json=request)
        assert response.status_code == 202, response.text
        job = server.wait(response.json()["id"], "succeeded")
        assert job["options"]["model"] == MODEL and job["progress"]["stage"] == "name"
        result = server.http.get(f"/v1/jobs/{job['id']}/result").json()
        assert result["run"]["counts"] == {"items": IMAGES, "embedded": IMAGES, "skipped": 0}
        assert result["run"]["encoder"]["id"] == MODEL and len(result["clusters"]) == 2
        assert set(result["metrics"]) >= {"acc", "nmi", "ari"}
        yield _summary(server, job["id"])
    finally:
        server.stop()


def test_served_job_matches_its_assignments(reference: tuple[list, dict]) -> None:
    clusters, assignments = reference
    assert len(assignments) == IMAGES and sum(size for size, _ in clusters) == IMAGES
    assert sorted(set(assignments.values())) == [0, 1]
    for cluster_id, (size, _) in enumerate(clusters):
        assert sum(c == cluster_id for c in assignments.values()) == size


def test_sigkill_mid_job_then_restart_gives_the_same_result(
    photos: Path, tmp_path: Path, reference: tuple[list, dict]
) -> None:
    data, log = tmp_path / "data", tmp_path / "server.log"
    server = Server(data, photos.parent, log)
    request = {
        "source": {"type": "folder", "path": str(photos), "labels_from_folders": True},
        "options": OPTIONS,
    }
    job_id = server.http.post("/v1/jobs", json=request).json()["id"]
    job = server.wait(job_id, "running")
    deadline = time.monotonic() + 60
    while not ((progress := job["progress"]) and progress["stage"] == "embed" and progress["done"] >= 2):
        assert job["status"] == "running" and time.monotonic() < deadline, job
        time.sleep(0.02)
        job = server.http.get(f"/v1/jobs/{job_id}").json()
    server.kill()
    assert list((data / "jobs" / job_id / "features").iterdir()), "the killed run left no feature chunks"

    restarted = Server(data, photos.parent, log)
    try:
        job = restarted.wait(job_id, "succeeded")
        assert job["attempts"] == 2
        assert _summary(restarted, job_id) == reference
    finally:
        restarted.stop()
