"""Property-based fuzzing of the API from its own OpenAPI schema (schemathesis): no input gives a 500, and
answers match the documented status codes, content types, headers and schemas, for valid and invalid
input, on a service without keys and on one with keys.

Cases come from each operation's Hypothesis strategy (``APIOperation.as_strategy``) rather than from
schemathesis's pytest plugin, so the test runs the same on every pytest release.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.core.result import Ok
from service_testing import CountingEncoderFactory, FakePipeline

from cpp.service.app import create_app
from cpp.service.settings import Settings

#: Generated cases per operation, generation mode and service (two modes, two services).
EXAMPLES = 40
KEY = "fuzz-key"
UPLOAD_ACCEPTED = ["2xx", "401", "403", "404", "409", "413", "415", "422"]


@dataclass
class Fuzzed:
    schema: schemathesis.BaseSchema
    cases: int = 0
    failures: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module", params=["no-keys", "keys"])
def fuzzed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "images"
    root.mkdir()
    keyed = request.param == "keys"
    app = create_app(
        Settings(
            data_dir=base / "data",
            allowed_roots=[root],
            api_keys=[KEY] if keyed else [],
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
    config = SchemathesisConfig.from_dict(
        {
            # With keys, schemathesis sends a valid key through the schema's own scheme and probes without it.
            "auth": {"openapi": {"APIKeyHeader": {"api_key": KEY}}} if keyed else {},
            # A schema-valid upload may hold bytes that are no image (the schema cannot say "an image or a
            # zip of images"); refusing them (415/422) or an over-large one (413) is right, not a rejection of
            # valid input.
            "operations": [
                {
                    "include-path": "/v1/jobs/upload",
                    "checks": {"positive_data_acceptance": {"expected-statuses": UPLOAD_ACCEPTED}},
                }
            ],
        }
    )
    with TestClient(app):  # runs the lifespan: store and worker stay up while the module's tests run
        yield Fuzzed(schemathesis.openapi.from_asgi("/openapi.json", app, config=config))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_never_fails_on_generated_input(fuzzed: Fuzzed, mode: GenerationMode) -> None:
    operations = []
    for result in fuzzed.schema.get_all_operations():
        assert isinstance(result, Ok), result  # the schema itself is valid
        operations.append(result.ok())
    before = fuzzed.cases
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case: schemathesis.Case) -> None:
            fuzzed.cases += 1
            case.call_and_validate()

        try:
            check()
        except Unsatisfiable:  # an operation without parameters or body has no invalid input to generate
            parameters = [operation.path_parameters, operation.query, operation.headers, operation.body]
            assert mode is GenerationMode.NEGATIVE and not any(len(p) for p in parameters)
        except Exception as exc:  # every operation is fuzzed; failures are reported together
            fuzzed.failures[f"{mode.value} {operation.label}"] = f"{type(exc).__name__}: {exc}"
    assert len(operations) == 11
    # The eight operations with parameters or a body give EXAMPLES cases each (about 320 per run, 1,280 in
    # all); those without give one, or none when the input must be invalid.
    assert fuzzed.cases - before >= 7 * EXAMPLES
    assert not fuzzed.failures, "\n\n".join(f"{k}:\n{v}" for k, v in fuzzed.failures.items())


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


def test_schema_says_what_this_server_accepts(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, devices=["cpu", "cuda:0"], max_upload_files=7))
    schema = app.openapi()
    device = schema["components"]["schemas"]["ClusterOptions"]["properties"]["device"]
    assert device["enum"] == ["auto", "cpu", "cuda:0"]
    upload = schema["paths"]["/v1/jobs/upload"]["post"]["requestBody"]["content"]["multipart/form-data"]
    files = upload["schema"]["properties"]["files"]
    assert (files["minItems"], files["maxItems"]) == (1, 7)
    assert "securitySchemes" not in schema["components"]  # no keys: no credentials asked for
    keyed = create_app(Settings(data_dir=tmp_path, api_keys=["k"])).openapi()
    assert set(keyed["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}


def test_method_not_allowed_names_every_allowed_method(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(data_dir=tmp_path, run_workers=False))) as client:
        job = "/v1/jobs/" + "0" * 32
        for method, path, allow in [
            ("GET", "/v1/jobs/upload", "POST"),
            ("PUT", "/v1/jobs", "GET, POST"),
            ("PATCH", job, "GET, DELETE"),
            ("GET", job + "/cancel", "POST"),
        ]:
            response = client.request(method, path)
            assert (response.status_code, response.headers["allow"]) == (405, allow), (method, path)
