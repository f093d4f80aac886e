"""The upload form fields shared by cluster and assignment uploads: booleans, options JSON, request body."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpp.options import AssignOptions, ClusterOptions
from cpp.service.app import create_app
from cpp.service.forms import form_bool, form_options
from cpp.service.problems import ApiProblem
from cpp.service.settings import Settings


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, False), ("", False), (" Yes ", True), ("1", True), ("on", True), ("0", False), ("OFF", False)],
)
def test_form_bool_reads_the_usual_spellings(value: str | None, expected: bool) -> None:
    assert form_bool(value, "labels_from_folders") is expected


def test_form_bool_names_the_field_of_a_bad_value() -> None:
    with pytest.raises(ApiProblem) as caught:
        form_bool("maybe", "labels_from_folders")
    assert (caught.value.status, caught.value.kind) == (422, "validation")
    assert caught.value.detail == "labels_from_folders: expected true or false, got 'maybe'"


def test_form_options_defaults_when_absent() -> None:
    assert form_options(ClusterOptions, None) == ClusterOptions()
    assert form_options(AssignOptions, "") == AssignOptions()
    assert form_options(AssignOptions, '{"novelty_quantile": 0.05}').novelty_quantile == 0.05


@pytest.mark.parametrize(
    ("model", "raw", "field"),
    [
        (ClusterOptions, '{"clusters": 100000}', "clusters"),
        (AssignOptions, '{"novelty_quantile": 5}', "novelty_quantile"),
    ],
)
def test_form_options_names_the_model_and_each_bad_field(model: type, raw: str, field: str) -> None:
    with pytest.raises(ApiProblem) as caught:
        form_options(model, raw)
    problem = caught.value.to_problem()
    assert (problem.status, problem.type) == (422, "urn:cpp:problem:validation")
    assert problem.detail == f"form field 'options' is not valid {model.__name__} JSON"
    assert problem.errors and all(e["loc"][:2] == ["options", field] for e in problem.errors)


def test_form_options_refuses_json_that_is_not_an_object() -> None:
    with pytest.raises(ApiProblem) as caught:
        form_options(ClusterOptions, "[1, 2")
    assert caught.value.status == 422


def test_each_upload_route_documents_its_own_options_model(tmp_path: Path) -> None:
    paths = create_app(Settings(data_dir=tmp_path)).openapi()["paths"]
    for path, model in [
        ("/v1/jobs/upload", "ClusterOptions"),
        ("/v1/clusterings/{clustering_id}/assignments/upload", "AssignOptions"),
    ]:
        schema = paths[path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert schema["required"] == ["files"]
        assert schema["properties"]["options"]["description"].startswith(f"{model} as a JSON object")
