"""API behaviour over a scripted pipeline: every endpoint, status change and error answer."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_testing import CountingEncoderFactory, FakePipeline, assert_problem, wait_for, wait_status

from cpp.result import ClusterResult
from cpp.service.app import create_app
from cpp.service.settings import Settings
from cpp.service.store import open_store


def body(image_root: Path, **options: object) -> dict:
    return {"source": {"type": "folder", "path": str(image_root / "set")}, "options": options}


def test_job_runs_to_a_result(client: TestClient, image_root: Path) -> None:
    response = client.post("/v1/jobs", json=body(image_root, clusters=2))
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["options"]["model"] == "fake-model"  # 'auto' resolved to CPP_MODEL
    done = wait_status(client, job["id"], "succeeded")
    assert done["progress"] == {
        "stage": "embed",
        "done": 3,
        "total": 3,
        "rate": done["progress"]["rate"],
        "eta_s": 0.0,
    }
    assert done["started_at"] and done["finished_at"] and done["attempts"] == 1
    result = ClusterResult.model_validate(client.get(f"/v1/jobs/{job['id']}/result").json())
    assert result.run.counts.items == 4 and [c.size for c in result.clusters] == [2, 2]
    page = client.get(f"/v1/jobs/{job['id']}/assignments", params={"offset": 1, "limit": 2}).json()
    assert page["total"] == 4 and [a["key"] for a in page["items"]] == ["a/1.png", "b/2.png"]


def test_encoder_is_built_once_per_spec(
    client: TestClient, image_root: Path, encoders: CountingEncoderFactory
) -> None:
    ids = [client.post("/v1/jobs", json=body(image_root, seed=s)).json()["id"] for s in range(3)]
    ids.append(client.post("/v1/jobs", json=body(image_root, model="other-model")).json()["id"])
    for job_id in ids:
        wait_status(client, job_id, "succeeded")
    assert encoders.built == [("fake-model", "cpu"), ("other-model", "cpu")]


def test_jobs_run_at_lower_priority_than_the_api(
    client: TestClient, image_root: Path, fake: FakePipeline
) -> None:
    api_niceness = os.getpriority(os.PRIO_PROCESS, 0)
    wait_status(client, client.post("/v1/jobs", json=body(image_root)).json()["id"], "succeeded")
    assert fake.niceness == [max(10, api_niceness)]
    assert os.getpriority(os.PRIO_PROCESS, 0) == api_niceness  # the API's own threads keep theirs


def test_list_filters_and_pages(client: TestClient, image_root: Path, fake: FakePipeline) -> None:
    fake.release.clear()
    ids = [client.post("/v1/jobs", json=body(image_root, seed=s)).json()["id"] for s in range(3)]
    wait_status(client, ids[0], "running")
    listing = client.get("/v1/jobs", params={"status": "queued"}).json()
    assert listing["total"] == 2 and [j["id"] for j in listing["items"]] == [ids[2], ids[1]]
    page = client.get("/v1/jobs", params={"offset": 1, "limit": 1}).json()
    assert page["total"] == 3 and [j["id"] for j in page["items"]] == [ids[1]]
    assert_problem(client.get("/v1/jobs", params={"status": "bogus"}), 422, "validation")
    assert_problem(client.get("/v1/jobs", params={"limit": 0}), 422, "validation")
    fake.release.set()


def test_result_and_assignments_are_409_until_succeeded(
    client: TestClient, image_root: Path, fake: FakePipeline
) -> None:
    fake.release.clear()
    job_id = client.post("/v1/jobs", json=body(image_root)).json()["id"]
    wait_for(client, job_id, lambda j: j["status"] == "running" and j["progress"] is not None)
    problem = assert_problem(client.get(f"/v1/jobs/{job_id}/result"), 409, "job-not-finished")
    assert problem["job_status"] == "running"
    assert_problem(client.get(f"/v1/jobs/{job_id}/assignments"), 409, "job-not-finished")
    fake.release.set()
    wait_status(client, job_id, "succeeded")


def test_cancel_running_and_queued_jobs(client: TestClient, image_root: Path, fake: FakePipeline) -> None:
    fake.release.clear()
    running = client.post("/v1/jobs", json=body(image_root, seed=1)).json()["id"]
    queued = client.post("/v1/jobs", json=body(image_root, seed=2)).json()["id"]
    wait_status(client, running, "running")
    answer = client.post(f"/v1/jobs/{queued}/cancel")
    assert answer.status_code == 202 and answer.json()["status"] == "cancelled"
    answer = client.post(f"/v1/jobs/{running}/cancel")
    assert answer.status_code == 202 and answer.json()["cancel_requested"] is True
    assert wait_status(client, running, "cancelled", "succeeded")["status"] == "cancelled"
    assert_problem(client.get(f"/v1/jobs/{running}/result"), 409, "job-has-no-result")
    assert client.post(f"/v1/jobs/{running}/cancel").status_code == 202  # cancelling again is harmless
    fake.release.set()
    done = client.post("/v1/jobs", json=body(image_root, seed=3)).json()["id"]
    wait_status(client, done, "succeeded")
    assert_problem(client.post(f"/v1/jobs/{done}/cancel"), 409, "job-finished")


def test_cancel_through_the_store_reaches_the_worker(
    client: TestClient, image_root: Path, fake: FakePipeline, settings: Settings
) -> None:
    """Another process (here: a second store handle) flags the job; the worker's monitor stops it."""
    fake.release.clear()
    job_id = client.post("/v1/jobs", json=body(image_root)).json()["id"]
    wait_status(client, job_id, "running")
    other = open_store(None, settings.sqlite_path)
    other.request_cancel(job_id)
    other.close()
    assert wait_status(client, job_id, "cancelled")["status"] == "cancelled"
    fake.release.set()


def test_delete_removes_files_and_cancels_running_jobs(
    client: TestClient, image_root: Path, fake: FakePipeline, settings: Settings
) -> None:
    finished = client.post("/v1/jobs", json=body(image_root, seed=1)).json()["id"]
    wait_status(client, finished, "succeeded")
    assert (settings.jobs_dir / finished / "result.json").is_file()
    assert client.delete(f"/v1/jobs/{finished}").status_code == 204
    assert not (settings.jobs_dir / finished).exists()
    assert_problem(client.get(f"/v1/jobs/{finished}"), 404, "not-found")
    fake.release.clear()
    running = client.post("/v1/jobs", json=body(image_root, seed=2)).json()["id"]
    wait_status(client, running, "running")
    assert client.delete(f"/v1/jobs/{running}").status_code == 204
    assert not (settings.jobs_dir / running).exists()
    assert_problem(client.delete(f"/v1/jobs/{running}"), 404, "not-found")
    fake.release.set()


def test_missing_folder_is_refused_at_submission(client: TestClient, image_root: Path) -> None:
    missing = {"source": {"type": "folder", "path": str(image_root / "gone")}}
    assert_problem(client.post("/v1/jobs", json=missing), 422, "bad-source")
    assert client.get("/v1/jobs").json()["total"] == 0


def test_failed_job_carries_a_problem(client: TestClient, fake: FakePipeline, image_root: Path) -> None:
    (image_root / "gone").mkdir()
    fake.release.clear()
    job_id = client.post("/v1/jobs", json={"source": {"type": "folder", "path": str(image_root / "gone")}})
    (image_root / "gone").rmdir()  # removed after submission: the job itself finds it missing
    fake.release.set()
    job = wait_status(client, job_id.json()["id"], "failed")
    assert job["error"]["type"] == "urn:cpp:problem:bad-input" and "does not exist" in job["error"]["detail"]
    assert_problem(client.get(f"/v1/jobs/{job['id']}/result"), 409, "job-has-no-result")


def test_idempotency_key(client: TestClient, image_root: Path) -> None:
    headers = {"Idempotency-Key": "k-1"}
    first = client.post("/v1/jobs", json=body(image_root, seed=5), headers=headers)
    again = client.post("/v1/jobs", json=body(image_root, seed=5), headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    assert_problem(
        client.post("/v1/jobs", json=body(image_root, seed=6), headers=headers), 422, "idempotency-key-reused"
    )
    assert client.get("/v1/jobs").json()["total"] == 1


@pytest.mark.parametrize(
    ("path", "status", "kind"),
    [
        ("/etc", 403, "path-not-allowed"),
        ("relative/path", 403, "path-not-allowed"),
        ("{root}/set/../../", 403, "path-not-allowed"),
        ("{root}/escape", 403, "path-not-allowed"),  # a symlink out of the root
    ],
)
def test_server_paths_stay_under_allowed_roots(
    client: TestClient, image_root: Path, tmp_path: Path, path: str, status: int, kind: str
) -> None:
    (image_root / "escape").symlink_to(tmp_path / "data")
    request = {"source": {"type": "folder", "path": path.format(root=image_root)}}
    assert_problem(client.post("/v1/jobs", json=request), status, kind)


def test_other_server_paths_are_checked(client: TestClient, image_root: Path) -> None:
    outside = {"source": {"type": "files", "path": "/etc/hostname.txt"}}
    assert_problem(client.post("/v1/jobs", json=outside), 403, "path-not-allowed")
    listing = image_root / "list.txt"  # its entries are checked by the job as it reads them
    listing.write_text(f"{image_root}/set/a/0.png\n/etc/hostname\n")
    files = {"source": {"type": "files", "path": str(listing)}}
    assert client.post("/v1/jobs", json=files).status_code == 202
    vocab = body(image_root, vocabulary=["cifar10", "/etc/passwd"])
    assert_problem(client.post("/v1/jobs", json=vocab), 403, "path-not-allowed")
    shards = {"source": {"type": "webdataset", "path": "/etc/{000..003}.tar"}}
    assert_problem(client.post("/v1/jobs", json=shards), 403, "path-not-allowed")
    huge = {"source": {"type": "webdataset", "path": f"{image_root}/{{0..99999999}}.tar"}}
    assert_problem(client.post("/v1/jobs", json=huge), 422, "bad-source")
    coco = {"source": {"type": "coco", "path": str(image_root), "annotations": ["/etc/passwd"]}}
    assert_problem(client.post("/v1/jobs", json=coco), 403, "path-not-allowed")


def test_cheap_checks_happen_at_submission(client: TestClient, image_root: Path) -> None:
    assert_problem(client.post("/v1/jobs", json=body(image_root, seed=2**31)), 422, "validation")
    assert_problem(client.post("/v1/jobs", json=body(image_root, vocabulary=[])), 422, "validation")
    assert_problem(client.post("/v1/jobs", json=body(image_root, vocabulary=[""])), 422, "validation")
    assert_problem(client.post("/v1/jobs", json=body(image_root, device="gpu")), 422, "validation")
    long_name = {"source": {"type": "folder", "path": f"{image_root}/{'x' * 256}"}}
    assert "255 bytes" in assert_problem(client.post("/v1/jobs", json=long_name), 422, "bad-source")["detail"]
    (image_root / "shards").mkdir()
    many = {"source": {"type": "webdataset", "path": f"{image_root}/shards/{{00000..99999}}.tar"}}
    started = time.monotonic()
    assert client.post("/v1/jobs", json=many).status_code == 202  # 100,000 shards: expanded by the job
    assert time.monotonic() - started < 2
    wildcard = {"source": {"type": "webdataset", "path": f"{image_root}/*/x.tar"}}
    assert_problem(client.post("/v1/jobs", json=wildcard), 422, "bad-source")
    assert client.post("/v1/jobs", json=body(image_root, seed=2**31 - 1)).status_code == 202
    deep = {"source": {"type": "folder", "path": str(image_root) + ("/" + "é" * 100) * 22}}
    assert "4095 bytes" in assert_problem(client.post("/v1/jobs", json=deep), 422, "bad-source")["detail"]
    names = ",".join(f"train-part-{i:03d}" for i in range(30))  # each name short, the pattern long
    listed = {"source": {"type": "webdataset", "path": f"{image_root}/shards/{{{names}}}.tar"}}
    assert client.post("/v1/jobs", json=listed).status_code == 202
    for pattern, reason in [("{0000x}", "bad brace"), ("{3..1}", "empty range"), ("{00..01", "unbalanced")]:
        bad = {"source": {"type": "webdataset", "path": f"{image_root}/shards/{pattern}.tar"}}
        assert reason in assert_problem(client.post("/v1/jobs", json=bad), 422, "bad-source")["detail"]
    parent = {"source": {"type": "webdataset", "path": f"{image_root}/shards/{{x,..}}/{{0..9}}.tar"}}
    assert_problem(client.post("/v1/jobs", json=parent), 403, "path-not-allowed")


def test_model_and_device_policy(client: TestClient, image_root: Path) -> None:
    assert_problem(
        client.post("/v1/jobs", json=body(image_root, model="open_clip:X//tmp/evil.pt")),
        403,
        "model-not-allowed",
    )
    assert_problem(
        client.post("/v1/jobs", json=body(image_root, device="cuda:3")), 422, "device-not-available"
    )
    assert client.post("/v1/jobs", json=body(image_root, device="cpu")).status_code == 202


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"source": {"type": "folder"}},
        {"source": {"type": "nope", "path": "/x"}},
        {"source": {"type": "folder", "path": "/x"}, "options": {"clusters": 1}},
        {"source": {"type": "folder", "path": "/x"}, "options": {"unknown": 1}},
        {"source": {"type": "folder", "path": "/x"}, "extra": True},
        [1, 2],
    ],
)
def test_validation_errors_are_problems(client: TestClient, payload: object) -> None:
    problem = assert_problem(client.post("/v1/jobs", json=payload), 422, "validation")
    assert problem["errors"] and all({"loc", "msg", "type"} <= set(e) for e in problem["errors"])


def test_malformed_requests(client: TestClient) -> None:
    assert_problem(
        client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}),
        422,
        "validation",
    )
    assert_problem(client.get("/v1/jobs/not-a-job-id"), 404)  # only job ids match the job routes
    assert_problem(client.get("/v1/jobs/" + "0" * 32), 404, "not-found")
    assert_problem(client.get("/nowhere"), 404)
    assert_problem(client.put("/v1/jobs"), 405)
    big = b'{"source": {"type": "folder", "path": "' + b"x" * 2_000_000 + b'"}}'
    assert_problem(client.post("/v1/jobs", content=big, headers={"content-type": "application/json"}), 413)
    chunks = iter([b'{"source":', b" {}}"])
    assert_problem(client.post("/v1/jobs", content=chunks, headers={"content-type": "application/json"}), 411)


def test_api_keys(
    settings: Settings, fake: FakePipeline, encoders: CountingEncoderFactory, image_root: Path
) -> None:
    secured = settings.model_copy(update={"api_keys": ["s3cret", "other"]})
    with TestClient(create_app(secured, pipeline=fake, encoder_factory=encoders)) as client:
        problem = assert_problem(client.get("/v1/jobs"), 401, "unauthorized")
        assert "Bearer" in problem["detail"]
        assert client.get("/v1/jobs").headers["www-authenticate"] == "Bearer"
        assert_problem(client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/v1/jobs", headers={"X-API-Key": "other"}).status_code == 200
        assert_problem(client.post("/v1/jobs", json=body(image_root)), 401)
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CPP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CPP_ALLOWED_ROOTS", f"{tmp_path}/a, {tmp_path}/b")
    monkeypatch.setenv("CPP_API_KEYS", "k1,k2")
    monkeypatch.setenv("CPP_MODEL", "effnet-lite0-in1k")
    monkeypatch.setenv("CPP_MAX_UPLOAD_FILES", "7")
    settings = Settings()
    assert settings.allowed_roots == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]
    assert settings.api_keys == ["k1", "k2"] and settings.model == "effnet-lite0-in1k"
    assert settings.max_upload_files == 7 and settings.data_dir == tmp_path


def test_health_and_metrics(client: TestClient, image_root: Path) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["checks"]["workers"] == "1 of 1 alive"
    job_id = client.post("/v1/jobs", json=body(image_root)).json()["id"]
    wait_status(client, job_id, "succeeded")
    client.get("/v1/jobs/" + "0" * 32)
    text = client.get("/metrics").text
    assert 'cpp_jobs{status="succeeded"} 1.0' in text
    assert 'cpp_http_requests_total{method="GET",handler="get_job",status="404"} 1.0' in text
    assert 'cpp_jobs_finished_total{status="succeeded"} 1.0' in text
    assert "cpp_http_request_duration_seconds_bucket" in text


def test_readyz_reports_a_missing_data_dir(client: TestClient, settings: Settings) -> None:
    settings.jobs_dir.rmdir()
    problem = assert_problem(client.get("/readyz"), 503, "not-ready")
    assert problem["checks"]["database"] == "ok" and "data_dir" in problem["detail"]
    settings.jobs_dir.mkdir()
    assert client.get("/readyz").status_code == 200


def test_restart_resumes_running_and_queued_jobs(
    settings: Settings, fake: FakePipeline, encoders: CountingEncoderFactory, image_root: Path
) -> None:
    fake.release.clear()
    with TestClient(create_app(settings, pipeline=fake, encoder_factory=encoders)) as client:
        running = client.post("/v1/jobs", json=body(image_root, seed=1)).json()["id"]
        queued = client.post("/v1/jobs", json=body(image_root, seed=2)).json()["id"]
        wait_status(client, running, "running")
    # The shutdown put the running job back in the queue; a new app runs both.
    store = open_store(None, settings.sqlite_path)
    assert {store.get(running).status.value, store.get(queued).status.value} == {"queued"}  # type: ignore[union-attr]
    store.close()
    fake.release.set()
    with TestClient(create_app(settings, pipeline=fake, encoder_factory=encoders)) as client:
        assert wait_status(client, running, "succeeded")["attempts"] == 2
        assert wait_status(client, queued, "succeeded")["attempts"] == 1


def test_api_answers_while_a_job_runs(client: TestClient, image_root: Path, fake: FakePipeline) -> None:
    fake.release.clear()
    job_id = client.post("/v1/jobs", json=body(image_root)).json()["id"]
    wait_status(client, job_id, "running")
    started = time.perf_counter()
    for _ in range(20):
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    assert time.perf_counter() - started < 5
    fake.release.set()


def test_upload_vocabulary_files_are_checked_too(client: TestClient) -> None:
    image = io.BytesIO()
    Image.new("RGB", (8, 8)).save(image, "PNG")
    response = client.post(
        "/v1/jobs/upload",
        files=[("files", ("a.png", image.getvalue(), "image/png"))],
        data={"options": '{"vocabulary": ["/etc/passwd"]}'},
    )
    assert_problem(response, 403, "path-not-allowed")
