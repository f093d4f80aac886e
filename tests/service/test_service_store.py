"""The job store on SQLite and, given CPP_TEST_DATABASE_URL (see .ci/postgres.sh), on PostgreSQL."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_testing import CountingEncoderFactory, FakePipeline, wait_status

from cpp.service.app import create_app
from cpp.service.settings import Settings
from cpp.service.store import IdempotencyConflict, JobStatus, JobStore, open_store

PG_URL = os.environ.get("CPP_TEST_DATABASE_URL")
needs_pg = pytest.mark.skipif(
    not PG_URL,
    reason="CPP_TEST_DATABASE_URL is unset: start a server with .ci/postgres.sh and export its URL",
)

StoreFactory = Callable[[], JobStore]


def _reset_pg() -> None:
    store = open_store(PG_URL, Path("unused"))
    store._query("DROP TABLE IF EXISTS jobs")
    store.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=needs_pg)])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens stores on one fresh database (each call: a new handle, as another process would have)."""
    if request.param == "postgres":
        _reset_pg()
    opened: list[JobStore] = []

    def factory() -> JobStore:
        url = PG_URL if request.param == "postgres" else None
        opened.append(open_store(url, tmp_path / "jobs.sqlite3"))
        return opened[-1]

    yield factory
    for store in opened:
        store.close()


def add(store: JobStore, device: str = "auto", key: str | None = None, digest: str = "h") -> str:
    job_id = uuid.uuid4().hex
    store.create(
        job_id=job_id,
        source={"type": "folder", "path": "/x"},
        options={"seed": 1},
        device=device,
        request_hash=digest,
        idempotency_key=key,
    )
    return job_id


def test_create_get_list_and_idempotency(make_store: StoreFactory) -> None:
    store = make_store()
    first = add(store, key="k")
    job = store.get(first)
    assert job is not None and job.status is JobStatus.queued and job.options == {"seed": 1}
    again, created = store.create(
        job_id=uuid.uuid4().hex, source={}, options={}, device="auto", request_hash="h", idempotency_key="k"
    )
    assert again.id == first and not created
    with pytest.raises(IdempotencyConflict):
        store.create(
            job_id=uuid.uuid4().hex,
            source={},
            options={},
            device="auto",
            request_hash="other",
            idempotency_key="k",
        )
    second = add(store)
    jobs, total = store.list_jobs(limit=1)
    assert total == 2 and [j.id for j in jobs] == [second]
    assert store.list_jobs(status=JobStatus.running) == ([], 0)
    assert store.counts()[JobStatus.queued] == 2
    assert store.delete(first) and not store.delete(first) and store.get(first) is None


def test_claim_heartbeat_finish(make_store: StoreFactory) -> None:
    store = make_store()
    gpu_job, any_job = add(store, device="cuda:0"), add(store)
    claimed = store.claim("w1", "cpu", lease_s=60)
    assert claimed is not None and claimed.id == any_job and claimed.attempts == 1  # skips the cuda:0 job
    assert store.claim("w1", "cpu", lease_s=60) is None
    assert store.heartbeat(any_job, "w1", {"stage": "embed", "done": 1, "total": 2}) is False
    assert store.heartbeat(any_job, "w2") is None  # not the owner
    assert store.get(any_job).progress == {"stage": "embed", "done": 1, "total": 2}  # type: ignore[union-attr]
    assert store.request_cancel(any_job).cancel_requested  # type: ignore[union-attr]
    assert store.heartbeat(any_job, "w1") is True
    assert not store.finish(any_job, "w2", JobStatus.cancelled)
    assert store.finish(any_job, "w1", JobStatus.cancelled)
    assert store.get(any_job).status is JobStatus.cancelled  # type: ignore[union-attr]
    assert store.claim("gpu", "cuda:0", lease_s=60).id == gpu_job  # type: ignore[union-attr]


def test_cancel_queued_release_and_requeue(make_store: StoreFactory) -> None:
    store = make_store()
    queued = add(store)
    assert store.request_cancel(queued).status is JobStatus.cancelled  # type: ignore[union-attr]
    assert store.claim("w", "cpu", 60) is None
    running = add(store)
    store.claim("w", "cpu", 60)
    assert store.release(running, "w") and store.get(running).status is JobStatus.queued  # type: ignore[union-attr]
    store.claim("w", "cpu", 60)
    assert store.requeue_running() == 1
    assert store.claim("w2", "cpu", 60).attempts == 3  # type: ignore[union-attr]


def test_a_lapsed_lease_is_taken_over(make_store: StoreFactory) -> None:
    store = make_store()
    job_id = add(store)
    assert store.claim("dead", "cpu", lease_s=60) is not None
    assert store.claim("alive", "cpu", lease_s=60) is None  # the lease holds
    time.sleep(0.05)
    taken = store.claim("alive", "cpu", lease_s=0.01)
    assert taken is not None and taken.id == job_id and taken.worker_id == "alive"
    assert store.heartbeat(job_id, "dead") is None and not store.finish(job_id, "dead", JobStatus.failed)


def test_concurrent_claimers_never_share_a_job(make_store: StoreFactory) -> None:
    setup = make_store()
    jobs = {add(setup) for _ in range(60)}
    claims: list[tuple[str, str]] = []
    lock = threading.Lock()
    stores = [make_store() for _ in range(4)]  # separate connections, like separate processes
    barrier = threading.Barrier(len(stores))

    def claimer(index: int) -> None:
        barrier.wait()
        while (job := stores[index].claim(f"w{index}", "cpu", 60)) is not None:
            with lock:
                claims.append((job.id, f"w{index}"))

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counted = Counter(job_id for job_id, _ in claims)
    assert set(counted) == jobs and max(counted.values()) == 1
    assert {setup.get(j).worker_id for j in jobs} <= {f"w{i}" for i in range(4)}  # type: ignore[union-attr]


@needs_pg
def test_two_services_share_one_postgres_queue(tmp_path: Path, image_root: Path) -> None:
    """Two app instances (as two processes would) drain one queue; each job runs exactly once."""
    _reset_pg()
    fakes = [FakePipeline(), FakePipeline()]
    apps = [
        create_app(
            Settings(
                data_dir=tmp_path / "data",
                database_url=PG_URL,
                allowed_roots=[image_root],
                model="fake-model",
                devices=["cpu"],
                poll_interval_s=0.02,
            ),
            pipeline=fake,
            encoder_factory=CountingEncoderFactory(),
        )
        for fake in fakes
    ]
    with TestClient(apps[0]) as one, TestClient(apps[1]) as two:
        request = {"source": {"type": "folder", "path": str(image_root / "set")}}
        ids = [
            (one if i % 2 else two).post("/v1/jobs", json={**request, "options": {"seed": i}}).json()["id"]
            for i in range(8)
        ]
        for job_id in ids:
            assert wait_status(one, job_id, "succeeded")["attempts"] == 1
        assert two.get(f"/v1/jobs/{ids[0]}/result").status_code == 200
    runs = Counter(str(work_dir.name) for fake in fakes for _, _, work_dir in fake.calls)
    assert set(runs) == set(ids) and max(runs.values()) == 1
