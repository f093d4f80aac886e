"""Property-based fuzzing of the API from its own OpenAPI schema (schemathesis): no input gives a 500,
and answers match the documented status codes, content types and schemas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from service_testing import CountingEncoderFactory, FakePipeline

from service.app import create_app
from service.settings import Settings

schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis is not installed (pip install -e .[dev])"
)
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "images"
    root.mkdir()
    app = create_app(
        Settings(
            data_dir=base / "data",
            allowed_roots=[root],
            model="fake-model",
            devices=["cpu"],
            poll_interval_s=0.05,
            max_upload_bytes=1_000_000,
            max_upload_files=10,
            delete_wait_s=1,
        ),
        pipeline=FakePipeline(batches=1),
        encoder_factory=CountingEncoderFactory(),
    )
    with TestClient(app):  # runs the lifespan: store and worker stay up while the module's tests run
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_api_never_fails_on_generated_input(case: object) -> None:
    case.call_and_validate(  # type: ignore[attr-defined]
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ]
    )


def test_schema_documents_every_route(tmp_path: Path) -> None:
    paths = create_app(Settings(data_dir=tmp_path)).openapi()["paths"]
    assert set(paths) == {
        "/v1/jobs",
        "/v1/jobs/upload",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/result",
        "/v1/jobs/{job_id}/assignments",
        "/v1/jobs/{job_id}/cancel",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    upload = paths["/v1/jobs/upload"]["post"]
    assert "multipart/form-data" in upload["requestBody"]["content"]
    assert paths["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
