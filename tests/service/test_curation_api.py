"""The curation and gallery API: views, thumbnails by row only, exports, edits as revisions, cookie log-in and
CSRF, owner checks."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from curation_testing import NAMES, ClusteringPipeline
from fastapi.testclient import TestClient
from PIL import Image
from service_testing import CountingEncoderFactory, wait_status

from cpp.service.app import create_app
from cpp.service.settings import Settings

KEY, OTHER = "key-one", "key-two"
ONE = {"X-API-Key": KEY}


def _job(client: TestClient, image_root: Path, headers: dict[str, str] | None = None) -> str:
    answer = client.post(
        "/v1/jobs", json={"source": {"type": "folder", "path": str(image_root / "set")}}, headers=headers
    )
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["id"]
    wait_status(client, job_id, "succeeded", headers=headers)
    return job_id


@pytest.fixture
def keyed(settings: Settings, encoders: CountingEncoderFactory) -> Iterator[TestClient]:
    secured = settings.model_copy(update={"api_keys": [KEY, OTHER]})
    with TestClient(create_app(secured, pipeline=ClusteringPipeline(), encoder_factory=encoders)) as client:
        yield client


@pytest.fixture
def keyless(settings: Settings, encoders: CountingEncoderFactory) -> Iterator[TestClient]:
    with TestClient(create_app(settings, pipeline=ClusteringPipeline(), encoder_factory=encoders)) as client:
        yield client


def test_views_thumbnails_and_exports(keyed: TestClient, image_root: Path) -> None:
    job = _job(keyed, image_root, ONE)
    base = f"/v1/clusterings/{job}"
    overview = keyed.get(f"{base}/overview?sort=name&descending=false&limit=4", headers=ONE).json()
    assert overview["total"] == 6 and len(overview["clusters"]) == 4 and overview["revision"] == 0
    assert [c["name"] for c in overview["clusters"]] == sorted(NAMES, key=str.casefold)[:4]
    assert all(len(c["thumbs"]) == 10 for c in overview["clusters"])
    assert keyed.get(f"{base}/overview?q=SKY", headers=ONE).json()["total"] == 1
    page = keyed.get(f"{base}/clusters/1?limit=5", headers=ONE).json()
    assert page["total"] == 12 and len(page["members"]) == 5 and page["cluster"]["alternatives"]
    confidences = [m["confidence"] for m in page["members"]]
    assert confidences == sorted(confidences, reverse=True)

    thumb = keyed.get(f"{base}/thumbnails/{page['members'][0]['row']}", headers=ONE)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    assert keyed.get(f"{base}/thumbnails/72", headers=ONE).status_code == 404  # rows are 0..71
    assert keyed.get(f"{base}/thumbnails/..%2F..%2Fetc%2Fpasswd", headers=ONE).status_code == 404
    assert keyed.get(f"{base}/thumbnails/etc", headers=ONE).status_code == 422  # rows only
    assert keyed.get(f"{base}/thumbnails/0").status_code == 401

    csv = keyed.get(f"{base}/export?format=csv", headers=ONE)
    assert csv.status_code == 200 and csv.text.splitlines()[0] == "path,key,cluster,name,confidence"
    assert "attachment" in csv.headers["content-disposition"] and len(csv.text.splitlines()) == 73
    coco = keyed.get(f"{base}/export?format=coco", headers=ONE).json()
    assert len(coco["images"]) == 72 and len(coco["categories"]) == 6
    assert keyed.get(f"{base}/export?format=folders", headers=ONE).status_code == 422
    run = keyed.get(f"{base}/run", headers=ONE).json()
    assert run["skipped_total"] == 1 and run["run"]["k_selection"]["k"] == 6
    points = keyed.get(f"{base}/map", headers=ONE).json()
    assert points["shown"] == 72 and max(points["x"]) == 1000 and len(points["cluster"]) == 72


def test_thumbnails_stay_inside_the_roots(keyed: TestClient, image_root: Path, tmp_path: Path) -> None:
    job = _job(keyed, image_root, ONE)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    jobs_dir: Path = keyed.app.state.services.settings.jobs_dir  # type: ignore[attr-defined]
    member = sorted((jobs_dir / job / "source" / "images" / "c0000").iterdir())[0]
    member.unlink()
    member.symlink_to(outside)  # a member that now points outside the roots and the job's folder
    page = keyed.get(f"/v1/clusterings/{job}/clusters/0?limit=100", headers=ONE).json()
    row = next(m["row"] for m in page["members"] if m["key"].endswith(member.name))
    answer = keyed.get(f"/v1/clusterings/{job}/thumbnails/{row}", headers=ONE)
    assert answer.status_code == 404 and "outside allowed roots" in answer.json()["detail"]


def test_edits_make_revisions_that_the_api_shows(keyed: TestClient, image_root: Path) -> None:
    job = _job(keyed, image_root, ONE)
    base = f"/v1/clusterings/{job}"
    renamed = keyed.post(f"{base}/clusters/0/rename", json={"name": "cats"}, headers=ONE)
    assert renamed.status_code == 200 and renamed.json() == {"revision": 1, "clusters": [0]}
    merged = keyed.post(
        f"{base}/merge", json={"clusters": [0, 1], "expected_revision": 1}, headers=ONE
    ).json()
    assert merged["revision"] == 2
    split = keyed.post(f"{base}/clusters/0/split", json={"parts": 2}, headers=ONE).json()
    assert split["revision"] == 3 and len(split["clusters"]) == 2
    rows = [m["row"] for m in keyed.get(f"{base}/clusters/2?limit=2", headers=ONE).json()["members"]]
    assert keyed.post(f"{base}/move", json={"rows": rows, "to": 3}, headers=ONE).json()["revision"] == 4
    assert keyed.post(f"{base}/outliers", json={"rows": rows}, headers=ONE).json()["revision"] == 5
    assert keyed.get(f"{base}/clusters/-1", headers=ONE).json()["total"] == 2
    info = keyed.get(base, headers=ONE).json()
    assert info["revision"] == 5 and len(info["clusters"]) == 6
    revisions = keyed.get(f"{base}/revisions", headers=ONE).json()
    assert [r["edit"]["op"] if r["edit"] else None for r in revisions] == [
        None,
        "rename",
        "merge",
        "split",
        "move",
        "outlier",
    ]
    stale = keyed.post(f"{base}/clusters/0/rename", json={"name": "x", "expected_revision": 1}, headers=ONE)
    assert stale.status_code == 409 and stale.json()["type"] == "urn:cpp:problem:revision-conflict"
    bad = keyed.post(f"{base}/clusters/40/rename", json={"name": "x"}, headers=ONE)
    assert bad.status_code == 404 and "cluster 40 does not exist" in bad.json()["detail"]
    restored = keyed.post(f"{base}/restore", json={"revision": 0}, headers=ONE).json()
    assert restored["revision"] == 6
    result = keyed.get(f"/v1/jobs/{job}/result", headers=ONE).json()
    assert result["revision"] == 6 and [e["op"] for e in result["edits"]][-1] == "restore"
    assert [c["name"] for c in result["clusters"]][:2] == NAMES[:2]


def test_other_keys_cannot_see_or_edit(keyed: TestClient, image_root: Path) -> None:
    job = _job(keyed, image_root, ONE)
    two = {"X-API-Key": OTHER}
    assert keyed.get(f"/v1/clusterings/{job}/overview", headers=two).status_code == 404
    assert keyed.get(f"/v1/clusterings/{job}/thumbnails/0", headers=two).status_code == 404
    assert (
        keyed.post(f"/v1/clusterings/{job}/merge", json={"clusters": [0, 1]}, headers=two).status_code == 404
    )


def test_cookie_log_in_and_csrf(keyed: TestClient, image_root: Path) -> None:
    job = _job(keyed, image_root, ONE)
    page = keyed.get("/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    token = keyed.cookies["cpp_csrf"]
    assert keyed.post("/ui/login", json={"key": KEY}).status_code == 403  # no CSRF header
    assert keyed.post("/ui/login", json={"key": "wrong"}, headers={"X-CSRF-Token": token}).status_code == 401
    login = keyed.post("/ui/login", json={"key": KEY}, headers={"X-CSRF-Token": token})
    assert login.status_code == 204
    cookie = login.headers["set-cookie"]
    assert "cpp_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert keyed.get("/ui/session").json() == {"keys_required": True, "signed_in": True}
    assert keyed.get(f"/v1/clusterings/{job}/overview").status_code == 200  # the cookie is accepted
    edit = f"/v1/clusterings/{job}/clusters/0/rename"
    refused = keyed.post(edit, json={"name": "no token"})
    assert refused.status_code == 403 and refused.json()["type"] == "urn:cpp:problem:csrf"
    assert keyed.post(edit, json={"name": "x"}, headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert keyed.post(edit, json={"name": "with token"}, headers={"X-CSRF-Token": token}).status_code == 200
    assert keyed.post("/ui/logout", headers={"X-CSRF-Token": token}).status_code == 204
    assert keyed.get(f"/v1/clusterings/{job}/overview").status_code == 401


def test_edits_on_a_service_without_keys_need_the_csrf_token(keyless: TestClient, image_root: Path) -> None:
    job = _job(keyless, image_root)
    edit = f"/v1/clusterings/{job}/clusters/0/rename"
    assert keyless.post(edit, json={"name": "x"}).status_code == 403
    keyless.get("/")
    token = keyless.cookies["cpp_csrf"]
    assert keyless.post(edit, json={"name": "x"}, headers={"X-CSRF-Token": token}).status_code == 200
    assert keyless.get("/ui/session").json() == {"keys_required": False, "signed_in": True}
    for asset, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        answer = keyless.get(f"/ui/{asset}")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind)
    assert keyless.get("/ui/../pyproject.toml").status_code == 404
    assert keyless.get("/ui/secret.py").status_code == 422
    assert json.loads(keyless.get("/openapi.json").text)["paths"]["/v1/clusterings/{clustering_id}/merge"]
