"""Tenants: each API key sees only its own jobs; admin keys see all; the database holds key ids, not keys."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_testing import CountingEncoderFactory, FakePipeline, assert_problem, wait_status

from cpp.service.api.deps import key_id
from cpp.service.app import create_app
from cpp.service.settings import Settings
from cpp.service.store import ANY_OWNER, open_store

A = {"X-API-Key": "key-a"}
B = {"Authorization": "Bearer key-b"}
ADMIN = {"X-API-Key": "root-key"}


@pytest.fixture
def tenants(settings: Settings, fake: FakePipeline, encoders: CountingEncoderFactory) -> Iterator[TestClient]:
    secured = settings.model_copy(update={"api_keys": ["key-a", "key-b"], "admin_keys": ["root-key"]})
    with TestClient(create_app(secured, pipeline=fake, encoder_factory=encoders)) as client:
        yield client


def _submit(client: TestClient, image_root: Path, headers: dict[str, str], **extra: object) -> str:
    body = {"source": {"type": "folder", "path": str(image_root / "set")}, "options": extra}
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def test_other_keys_jobs_are_invisible(tenants: TestClient, image_root: Path) -> None:
    job_a = _submit(tenants, image_root, A)
    job_b = _submit(tenants, image_root, B)
    wait_status(tenants, job_a, "succeeded", headers=A)
    listed_b = tenants.get("/v1/jobs", headers=B).json()
    assert [job["id"] for job in listed_b["items"]] == [job_b] and listed_b["total"] == 1
    for method, path in [
        ("GET", f"/v1/jobs/{job_a}"),
        ("GET", f"/v1/jobs/{job_a}/result"),
        ("GET", f"/v1/jobs/{job_a}/assignments"),
        ("POST", f"/v1/jobs/{job_a}/cancel"),
        ("DELETE", f"/v1/jobs/{job_a}"),
    ]:
        assert_problem(tenants.request(method, path, headers=B), 404, "not-found")
    assert tenants.get(f"/v1/jobs/{job_a}/result", headers=A).status_code == 200  # still there for its owner
    admin = tenants.get("/v1/jobs", headers=ADMIN).json()
    assert {job["id"] for job in admin["items"]} == {job_a, job_b}
    assert tenants.get(f"/v1/jobs/{job_b}", headers=ADMIN).status_code == 200


def test_idempotency_keys_are_per_tenant(tenants: TestClient, image_root: Path) -> None:
    body = {"source": {"type": "folder", "path": str(image_root / "set")}}
    first = tenants.post("/v1/jobs", json=body, headers={**A, "Idempotency-Key": "same"})
    other = tenants.post(
        "/v1/jobs", json=body | {"options": {"seed": 3}}, headers={**B, "Idempotency-Key": "same"}
    )
    assert first.status_code == 202 and other.status_code == 202  # B neither replays nor conflicts with A
    assert first.json()["id"] != other.json()["id"]
    again = tenants.post("/v1/jobs", json=body, headers={**A, "Idempotency-Key": "same"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]


def test_conflicting_credentials_are_refused(tenants: TestClient) -> None:
    assert_problem(
        tenants.get("/v1/jobs", headers={**A, "Authorization": "Bearer wrong"}), 401, "unauthorized"
    )
    assert_problem(tenants.get("/v1/jobs", headers={**A, **B}), 401, "unauthorized")
    same = {"X-API-Key": "key-a", "Authorization": "Bearer key-a"}
    assert tenants.get("/v1/jobs", headers=same).status_code == 200


def test_the_database_stores_key_ids_not_keys(
    tenants: TestClient, image_root: Path, settings: Settings
) -> None:
    job_a = _submit(tenants, image_root, A)
    store = open_store(None, settings.sqlite_path)
    try:
        record = store.get(job_a)
        assert record is not None and record.owner == key_id("key-a")
        assert store.get(job_a, key_id("key-b")) is None and store.get(job_a, ANY_OWNER) is not None
    finally:
        store.close()
    dump = "\n".join(sqlite3.connect(settings.sqlite_path).iterdump())
    assert "key-a" not in dump and key_id("key-a") in dump


def test_an_older_database_gains_the_owner_column(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as conn:  # the table as the first release created it
        conn.execute(
            "CREATE TABLE jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, source TEXT NOT NULL, "
            "options TEXT NOT NULL, device TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, "
            "updated_at DOUBLE PRECISION NOT NULL, started_at DOUBLE PRECISION, "
            "finished_at DOUBLE PRECISION, heartbeat_at DOUBLE PRECISION, worker_id TEXT, "
            "attempts INTEGER NOT NULL DEFAULT 0, progress TEXT, "
            "error TEXT, cancel_requested INTEGER NOT NULL DEFAULT 0, idempotency_key TEXT UNIQUE, "
            "request_hash TEXT NOT NULL)"
        )
        conn.execute(
            "INSERT INTO jobs (id, status, source, options, device, created_at, updated_at, request_hash) "
            "VALUES ('old', 'succeeded', '{}', '{}', 'cpu', 1, 1, 'h')"
        )
    store = open_store(None, path)
    try:
        old = store.get("old")
        assert old is not None and old.owner is None
        assert store.get("old", key_id("key-a")) is None  # jobs from before keys belong to no key
    finally:
        store.close()
