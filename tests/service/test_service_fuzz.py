"""Property-based fuzzing of the API from its own OpenAPI schema (schemathesis): no input gives a 500, and
answers match the documented status codes, content types, headers and schemas, for valid and invalid
input, on a service without keys and on one with keys.

Cases come from each operation's Hypothesis strategy (``APIOperation.as_strategy``) rather than from
schemathesis's pytest plugin, so the test runs the same on every pytest release. The service holds a
finished clustering (synthetic features and images, from :class:`curation_testing.ClusteringPipeline`) and
a finished assignment job of it; about half the cases of an operation with a ``clustering_id`` or
``assignment_id`` use those ids, so the curation, export, thumbnail and assignment routes are fuzzed
behind their 404s too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from curation_testing import ClusteringPipeline
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from service_testing import CountingEncoderFactory, wait_status

from cpp.service.api.deps import CSRF_COOKIE, CSRF_HEADER
from cpp.service.app import create_app
from cpp.service.settings import Settings

#: Generated cases per operation, generation mode and service (two modes, two services).
EXAMPLES = 40
KEY = "fuzz-key"
CSRF = "fuzz-csrf-token"
#: A schema-valid upload may hold bytes that are no image (the schema cannot say "an image or a zip of
#: images"); refusing them (415/422) or an over-large one (413) is right, not a rejection of valid input.
UPLOAD_ACCEPTED = ["2xx", "401", "403", "404", "409", "413", "415", "422"]
#: Edits whose bodies name clusters, rows, a revision or a number of parts: which exist depends on the
#: clustering's state, which the schema cannot say; refusing the others (422) is right.
EDIT_ACCEPTED = ["2xx", "401", "403", "404", "409", "422"]
EDITS_WITH_STATE = r"^/v1/clusterings/[^/]+/(merge|move|outliers|restore|clusters/[^/]+/split)$"
#: A new name must hold a printable character and no control or format characters (Unicode Cc, Cf): the
#: rename schema says so in words, since a JSON Schema pattern cannot name Unicode categories portably;
#: refusing such a name (422) is right.
RENAME = r"^/v1/clusterings/[^/]+/clusters/[^/]+/rename$"
#: Every operation the service documents (the UI page and its script and style, which hold no data, are the
#: only routes left out of the schema); the fuzz test runs cases against each one of the schema's.
OPERATIONS = {
    "POST /v1/jobs",
    "GET /v1/jobs",
    "POST /v1/jobs/upload",
    "GET /v1/jobs/{job_id}",
    "DELETE /v1/jobs/{job_id}",
    "GET /v1/jobs/{job_id}/result",
    "GET /v1/jobs/{job_id}/assignments",
    "POST /v1/jobs/{job_id}/cancel",
    "GET /v1/clusterings",
    "GET /v1/clusterings/{clustering_id}",
    "POST /v1/clusterings/{clustering_id}/assignments",
    "GET /v1/clusterings/{clustering_id}/assignments",
    "POST /v1/clusterings/{clustering_id}/assignments/upload",
    "GET /v1/clusterings/{clustering_id}/assignments/{assignment_id}",
    "DELETE /v1/clusterings/{clustering_id}/assignments/{assignment_id}",
    "GET /v1/clusterings/{clustering_id}/assignments/{assignment_id}/results",
    "GET /v1/clusterings/{clustering_id}/assignments/{assignment_id}/summary",
    "POST /v1/clusterings/{clustering_id}/assignments/{assignment_id}/cancel",
    "GET /v1/clusterings/{clustering_id}/overview",
    "GET /v1/clusterings/{clustering_id}/clusters/{cluster}",
    "GET /v1/clusterings/{clustering_id}/map",
    "GET /v1/clusterings/{clustering_id}/run",
    "GET /v1/clusterings/{clustering_id}/revisions",
    "GET /v1/clusterings/{clustering_id}/thumbnails/{row}",
    "GET /v1/clusterings/{clustering_id}/export",
    "POST /v1/clusterings/{clustering_id}/clusters/{cluster}/rename",
    "POST /v1/clusterings/{clustering_id}/merge",
    "POST /v1/clusterings/{clustering_id}/move",
    "POST /v1/clusterings/{clustering_id}/clusters/{cluster}/split",
    "POST /v1/clusterings/{clustering_id}/outliers",
    "POST /v1/clusterings/{clustering_id}/restore",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /ui/session",
    "POST /ui/login",
    "POST /ui/logout",
}


@dataclass
class Fuzzed:
    schema: schemathesis.BaseSchema
    #: Ids that exist in the service: ``job_id`` and ``clustering_id`` (a finished clustering's job) and
    #: ``assignment_id`` (a finished assignment job of it).
    ids: dict[str, str]
    #: Fixed cookies and headers of the cases that use those ids (the CSRF pair, without keys).
    cookies: dict[str, str]
    headers: dict[str, str]
    cases: int = 0
    failures: dict[str, str] = field(default_factory=dict)


def _finished_clustering(client: TestClient, root: Path, headers: dict[str, str]) -> dict[str, str]:
    """A succeeded cluster job (its clustering) and a finished assignment job of it."""
    for i in range(3):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(root / f"{i}.png")
    source = {"type": "folder", "path": str(root)}
    answer = client.post("/v1/jobs", json={"source": source}, headers=headers)
    assert answer.status_code == 202, answer.text
    clustering_id = answer.json()["id"]
    wait_status(client, clustering_id, "succeeded", headers=headers)
    answer = client.post(
        f"/v1/clusterings/{clustering_id}/assignments", json={"source": source}, headers=headers
    )
    assert answer.status_code == 202, answer.text
    assignment_id = answer.json()["id"]
    deadline = time.monotonic() + 30
    while client.get(f"/v1/clusterings/{clustering_id}/assignments/{assignment_id}", headers=headers).json()[
        "status"
    ] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, f"assignment {assignment_id} never finished"
        time.sleep(0.02)
    return {"job_id": clustering_id, "clustering_id": clustering_id, "assignment_id": assignment_id}


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
        pipeline=ClusteringPipeline(k=4, per=6),
        encoder_factory=CountingEncoderFactory(),
    )
    config = SchemathesisConfig.from_dict(
        {
            # With keys, schemathesis sends a valid key through the schema's own scheme and probes without it.
            "auth": {"openapi": {"APIKeyHeader": {"api_key": KEY}}} if keyed else {},
            "operations": [
                {
                    "include-path-regex": "/upload$",
                    "checks": {"positive_data_acceptance": {"expected-statuses": UPLOAD_ACCEPTED}},
                },
                {
                    "include-path-regex": EDITS_WITH_STATE,
                    "checks": {"positive_data_acceptance": {"expected-statuses": EDIT_ACCEPTED}},
                },
                {
                    "include-path-regex": RENAME,
                    "checks": {"positive_data_acceptance": {"expected-statuses": EDIT_ACCEPTED}},
                },
            ],
        }
    )
    auth = {"X-API-Key": KEY} if keyed else {}
    # The lifespan runs: store and worker stay up while the module's tests run.
    with TestClient(app) as client:
        ids = _finished_clustering(client, root, auth)
        yield Fuzzed(
            schemathesis.openapi.from_asgi("/openapi.json", app, config=config),
            ids,
            # Without keys, edits need the CSRF cookie repeated as a header (as the UI sends them).
            cookies={} if keyed else {CSRF_COOKIE: CSRF},
            headers={} if keyed else {CSRF_HEADER: CSRF},
        )


def _strategy(fuzzed: Fuzzed, operation: Any, mode: GenerationMode) -> st.SearchStrategy[schemathesis.Case]:
    """Generated cases, and for an operation on a clustering or an assignment also cases with the existing
    ids (not for DELETE, which would remove them for the operations after it)."""
    generated = operation.as_strategy(generation_mode=mode)
    names = {p.name for p in operation.path_parameters}
    known = {name: value for name, value in fuzzed.ids.items() if name in names}
    if not known or operation.method.upper() == "DELETE":
        return generated
    others = [operation.query, operation.headers, operation.body]
    if mode is GenerationMode.NEGATIVE and names == set(known) and not any(len(p) for p in others):
        return generated  # nothing else to make invalid
    csrf = CSRF_HEADER in {p.name for p in operation.headers}
    existing = operation.as_strategy(
        generation_mode=mode,
        path_parameters=known,
        cookies=fuzzed.cookies if csrf else None,
        headers=fuzzed.headers if csrf else None,
    )
    return st.one_of(generated, existing)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_never_fails_on_generated_input(fuzzed: Fuzzed, mode: GenerationMode) -> None:
    operations = []
    for result in fuzzed.schema.get_all_operations():
        assert isinstance(result, Ok), result  # the schema itself is valid
        operations.append(result.ok())
    before = fuzzed.cases
    cases: dict[str, int] = {}  # per operation
    unsatisfiable: set[str] = set()
    with_input = 0
    for operation in operations:
        parameters = [operation.path_parameters, operation.query, operation.headers, operation.body]
        with_input += any(len(p) for p in parameters)
        start = fuzzed.cases

        @given(case=_strategy(fuzzed, operation, mode))
        @settings(
            max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case: schemathesis.Case) -> None:
            fuzzed.cases += 1
            case.call_and_validate()

        try:
            check()
        except Unsatisfiable:  # an operation without parameters or body has no invalid input to generate
            assert mode is GenerationMode.NEGATIVE and not any(len(p) for p in parameters)
            unsatisfiable.add(operation.label)
        except (FailureGroup, Exception) as exc:  # every operation is fuzzed; failures are reported together
            fuzzed.failures[f"{mode.value} {operation.label}"] = f"{type(exc).__name__}: {exc}"
        cases[operation.label] = fuzzed.cases - start
    # No operation is left unfuzzed: each got cases, or (negative mode) has no input to make invalid.
    assert set(cases) == OPERATIONS
    unfuzzed = [label for label, n in cases.items() if n == 0 and label not in unsatisfiable]
    assert not unfuzzed, unfuzzed
    # Operations with parameters or a body give EXAMPLES cases each; those without give one, or none when
    # the input must be invalid.
    assert fuzzed.cases - before >= with_input * EXAMPLES * 0.9
    assert not fuzzed.failures, "\n\n".join(f"{k}:\n{v}" for k, v in fuzzed.failures.items())


def test_schema_documents_every_route(tmp_path: Path) -> None:
    paths = create_app(Settings(data_dir=tmp_path)).openapi()["paths"]
    assert {f"{method.upper()} {path}" for path, item in paths.items() for method in item} == OPERATIONS
    upload = paths["/v1/jobs/upload"]["post"]
    assert "multipart/form-data" in upload["requestBody"]["content"]
    assignments = paths["/v1/clusterings/{clustering_id}/assignments/upload"]["post"]
    assert "multipart/form-data" in assignments["requestBody"]["content"]
    assert paths["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]


def test_schema_says_what_this_server_accepts(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, devices=["cpu", "cuda:0"], max_upload_files=7))
    schema = app.openapi()
    for options in ("ClusterOptions", "AssignOptions"):
        device = schema["components"]["schemas"][options]["properties"]["device"]
        assert device["enum"] == ["auto", "cpu", "cuda:0"], options
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
