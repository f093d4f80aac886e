"""``/v1/clusterings``: clusterings of finished jobs, owner-checked, and assignment jobs of new images.

The fast tests run the API over the scripted pipeline (its jobs leave a minimal clustering artifact written
here); the end-to-end test runs a real ``cpp serve`` (uvicorn) with the real pipeline and encoder.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_testing import CountingEncoderFactory, FakePipeline, assert_problem, wait_status
from test_service_e2e import IMAGES, OPTIONS, Server
from test_service_e2e import photos as photos  # the fixture: 32 real photos

from cpp import clustering
from cpp.result import ClusterResult
from cpp.service.app import create_app
from cpp.service.settings import Settings

A = {"X-API-Key": "key-a"}
B = {"X-API-Key": "key-b"}


@pytest.fixture
def tenants(settings: Settings, fake: FakePipeline, encoders: CountingEncoderFactory) -> Iterator[TestClient]:
    secured = settings.model_copy(update={"api_keys": ["key-a", "key-b"]})
    with TestClient(create_app(secured, pipeline=fake, encoder_factory=encoders)) as client:
        yield client


def _finished_job(client: TestClient, image_root: Path, settings: Settings, *, artifact: bool = True) -> str:
    """A succeeded cluster job of key A; with ``artifact``, its folder gets a minimal clustering (two
    clusters, no feature store: assignment jobs over it fail, with a problem)."""
    body = {"source": {"type": "folder", "path": str(image_root / "set")}}
    job_id: str = client.post("/v1/jobs", json=body, headers=A).json()["id"]
    wait_status(client, job_id, "succeeded", headers=A)
    if artifact:
        work = settings.jobs_dir / job_id
        result = ClusterResult.model_validate_json((work / "result.json").read_text())
        now = datetime.now(timezone.utc).isoformat()
        clustering.create(
            work,
            manifest=clustering.Manifest(
                id=clustering.new_id(),
                created_at=now,
                model="fake-model",
                encoder={"id": "fake-model"},
                options={},
                space="raw",
                head=None,
                novelty=clustering.Novelty(quantile=0.05, threshold=0.5),
                members=4,
            ),
            readout=clustering.ReadoutModel(
                centers=np.eye(2, 4, dtype=np.float32),
                bases=np.eye(4, dtype=np.float32)[None, :, :1].repeat(2, 0),
                labels=np.array([0, 1, 0, 1]),
                confidence=np.ones(4, dtype=np.float32),
                fit=np.ones(4, dtype=np.float32),
            ),
            result=result,
        )
    return job_id


def test_clusterings_of_finished_jobs_are_listed_and_owned(
    tenants: TestClient, image_root: Path, settings: Settings
) -> None:
    with_artifact = _finished_job(tenants, image_root, settings)
    without = _finished_job(tenants, image_root, settings, artifact=False)
    page = tenants.get("/v1/clusterings", headers=A).json()
    assert [c["id"] for c in page["items"]] == [with_artifact]
    info = tenants.get(f"/v1/clusterings/{with_artifact}", headers=A).json()
    assert info["revision"] == 0 and [c["name"] for c in info["clusters"]] == ["c0", "c1"]
    assert info["novelty"]["threshold"] == 0.5 and info["links"]["job"] == f"/v1/jobs/{with_artifact}"
    assert_problem(tenants.get(f"/v1/clusterings/{without}", headers=A), 409, "no-clustering")
    assert tenants.get("/v1/clusterings", headers=B).json()["items"] == []
    body = {"source": {"type": "folder", "path": str(image_root / "set")}}
    for method, path, payload in [
        ("GET", f"/v1/clusterings/{with_artifact}", None),
        ("GET", f"/v1/clusterings/{with_artifact}/assignments", None),
        ("POST", f"/v1/clusterings/{with_artifact}/assignments", body),
        ("GET", f"/v1/clusterings/{'0' * 32}", None),
    ]:
        assert_problem(tenants.request(method, path, json=payload, headers=B), 404, "not-found")


def test_a_running_job_has_no_clustering_yet(
    tenants: TestClient, image_root: Path, fake: FakePipeline
) -> None:
    fake.release.clear()
    body = {"source": {"type": "folder", "path": str(image_root / "set")}}
    job_id = tenants.post("/v1/jobs", json=body, headers=A).json()["id"]
    wait_status(tenants, job_id, "running", headers=A)
    problem = assert_problem(tenants.get(f"/v1/clusterings/{job_id}", headers=A), 409, "clustering-not-ready")
    assert problem["job_status"] == "running"
    fake.release.set()


def test_assignment_jobs_are_queued_checked_and_kept_apart_from_jobs(
    tenants: TestClient, image_root: Path, settings: Settings
) -> None:
    cid = _finished_job(tenants, image_root, settings)
    base = f"/v1/clusterings/{cid}/assignments"
    body = {
        "source": {"type": "folder", "path": str(image_root / "set")},
        "options": {"novelty_quantile": 0.1},
    }
    response = tenants.post(base, json=body, headers={**A, "Idempotency-Key": "k1"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["Location"] == job["links"]["self"] == f"{base}/{job['id']}"
    again = tenants.post(base, json=body, headers={**A, "Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    other = {**body, "options": {}}
    assert_problem(
        tenants.post(base, json=other, headers={**A, "Idempotency-Key": "k1"}), 422, "idempotency-key-reused"
    )
    outside = {"source": {"type": "folder", "path": "/etc"}}
    assert_problem(tenants.post(base, json=outside, headers=A), 403, "path-not-allowed")
    assert_problem(
        tenants.post(base, json={**body, "options": {"device": "cuda:3"}}, headers=A),
        422,
        "device-not-available",
    )
    # The job fails (the minimal clustering has no feature store) and says why.
    deadline = time.monotonic() + 60
    while (state := tenants.get(f"{base}/{job['id']}", headers=A).json())["status"] != "failed":
        assert time.monotonic() < deadline, state
        time.sleep(0.02)
    assert state["error"]["status"] == 422 and "feature store" in state["error"]["detail"]
    assert_problem(tenants.get(f"{base}/{job['id']}/results", headers=A), 409, "job-has-no-result")
    listed = tenants.get(base, headers=A).json()
    assert [j["id"] for j in listed["items"]] == [job["id"]] and listed["total"] == 1
    # Not a cluster job: /v1/jobs neither lists nor serves it.
    assert job["id"] not in {j["id"] for j in tenants.get("/v1/jobs", headers=A).json()["items"]}
    assert_problem(tenants.get(f"/v1/jobs/{job['id']}", headers=A), 404, "not-found")
    assert_problem(tenants.get(f"/v1/clusterings/{job['id']}", headers=A), 404, "not-found")
    # Deleting the cluster job deletes its assignment jobs.
    assert tenants.delete(f"/v1/jobs/{cid}", headers=A).status_code == 204
    assert_problem(tenants.get(f"{base}/{job['id']}", headers=A), 404, "not-found")


# -- end to end: a real `cpp serve` ------------------------------------------------------------------------


def _png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(out, "PNG")
    return out.getvalue()


@pytest.mark.slow
def test_assignment_flow_on_a_real_server(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CPP_API_KEYS", "key-a,key-b")
    server = Server(tmp_path / "data", photos.parent, tmp_path / "server.log")
    http = server.http
    try:
        source = {"type": "folder", "path": str(photos), "labels_from_folders": True}
        options = {**OPTIONS, "batch_size": 16}
        cid = http.post("/v1/jobs", json={"source": source, "options": options}, headers=A).json()["id"]
        _wait(http, f"/v1/jobs/{cid}", "succeeded")
        members = http.get(f"/v1/jobs/{cid}/assignments", params={"limit": 100}, headers=A).json()["items"]
        assert [c["id"] for c in http.get("/v1/clusterings", headers=A).json()["items"]] == [cid]
        assert http.get(f"/v1/clusterings/{cid}", headers=B).status_code == 404

        # The clustering's own images, from the server-side folder: their clusters come back, paged.
        base = f"/v1/clusterings/{cid}/assignments"
        response = http.post(base, json={"source": source}, headers=A)
        assert response.status_code == 202, response.text
        job = _wait(http, response.json()["links"]["self"], "succeeded")
        assert job["progress"]["stage"] == "assign" and job["progress"]["done"] == IMAGES
        lines: list[dict[str, Any]] = []
        page = f"{job['links']['results']}?limit=10"
        while page:
            answer = http.get(page, headers=A)
            assert answer.headers["content-type"].startswith("application/jsonl")
            assert answer.headers["X-Total-Count"] == str(IMAGES)
            lines += [json.loads(line) for line in answer.text.splitlines()]
            link = answer.headers.get("Link")
            page = link[1 : link.index(">")] if link else ""
        assert {line["key"]: line["cluster"] for line in lines} == {m["key"]: m["cluster"] for m in members}
        assert all(line["member"] and not line["novel"] for line in lines)
        summary = http.get(job["links"]["summary"], headers=A).json()
        assert summary["members"] == summary["embedded"] == IMAGES and summary["novel"] == 0
        assert http.get(job["links"]["summary"], headers=B).status_code == 404

        # An upload with a file that is not an image is refused at once, naming it (as job uploads are).
        good = [
            ("files", ("red.png", _png((220, 20, 20)), "image/png")),
            ("files", ("sky.png", _png((90, 150, 230)), "image/png")),
        ]
        options = {"options": '{"novelty_quantile": 0.2}'}
        bad = [*good, ("files", ("broken.jpg", b"not a jpeg", "image/jpeg"))]
        refused = http.post(f"{base}/upload", files=bad, data=options, headers=A)
        assert refused.status_code == 422 and "broken.jpg" in refused.json()["detail"], refused.text
        response = http.post(f"{base}/upload", files=good, data=options, headers=A)
        assert response.status_code == 202, response.text
        job = _wait(http, response.json()["links"]["self"], "succeeded")
        new = [json.loads(line) for line in http.get(job["links"]["results"], headers=A).text.splitlines()]
        assert sorted(line["key"] for line in new) == ["red.png", "sky.png"]
        assert not any(line["member"] for line in new) and all(
            isinstance(line["novel"], bool) for line in new
        )
        summary = http.get(job["links"]["summary"], headers=A).json()
        assert summary["skipped"] == [] and summary["novelty"]["quantile"] == 0.2

        # Cancelling a queued or running assignment.
        queued = http.post(base, json={"source": source, "options": {"batch_size": 1}}, headers=A).json()
        cancelled = http.post(queued["links"]["cancel"], headers=A)
        assert cancelled.status_code == 202
        _wait(http, queued["links"]["self"], "cancelled")
        assert http.get(f"{base}?status=succeeded", headers=A).json()["total"] == 2
    finally:
        server.stop()


def _wait(http: Any, path: str, status: str, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (job := http.get(path, headers=A).json())["status"] != status:
        assert job["status"] not in {"failed", "cancelled", "succeeded"} - {status}, job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return dict(job)
