"""RFC 9457 problem details: every error response is ``application/problem+json``."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from cpp.logging import get_logger

PROBLEM_JSON = "application/problem+json"
_TYPE_PREFIX = "urn:cpp:problem:"

log = get_logger("service")
_PHRASES = {s.value: s.phrase for s in HTTPStatus}


class Problem(BaseModel):
    """An RFC 9457 problem; ``errors`` lists field errors of a validation problem."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(default="about:blank", examples=["urn:cpp:problem:not-found"])
    title: str = Field(examples=["Not Found"])
    status: int = Field(examples=[404])
    detail: str | None = Field(default=None, examples=["no job with id 1f0c..."])
    instance: str | None = Field(default=None, examples=["/v1/jobs/1f0c..."])
    errors: list[dict[str, Any]] | None = None


class ApiProblem(Exception):
    """Raise from routes to answer with a problem; ``kind`` becomes ``urn:cpp:problem:<kind>``."""

    def __init__(
        self,
        status: int,
        kind: str,
        title: str,
        detail: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.kind = kind
        self.title = title
        self.detail = detail
        self.headers = headers
        self.extra = extra

    def to_problem(self, instance: str | None = None) -> Problem:
        return Problem(
            type=_TYPE_PREFIX + self.kind,
            title=self.title,
            status=self.status,
            detail=self.detail,
            instance=instance,
            **self.extra,
        )


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        problem.model_dump(exclude_none=True),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem answers for ``statuses``."""
    return {s: {"model": Problem, "content": {PROBLEM_JSON: {}}} for s in statuses}


def _json_safe_errors(errors: Any) -> list[dict[str, Any]]:
    safe = []
    for err in errors:
        item = {k: v for k, v in dict(err).items() if k in ("loc", "msg", "type")}
        item["loc"] = [p if isinstance(p, (str, int)) else str(p) for p in item.get("loc", ())]
        safe.append(item)
    return safe


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route takes at this path (Starlette's 405 names only the first matching route's)."""
    return [
        method
        for method in _METHODS
        if any(route.matches({**scope, "method": method})[0] is Match.FULL for route in app.router.routes)
    ]


def install_problem_handlers(app: FastAPI) -> None:
    """Answer HTTP errors, validation errors, :class:`ApiProblem` and unexpected errors with problems."""

    @app.exception_handler(ApiProblem)
    async def _api_problem(request: Request, exc: ApiProblem) -> JSONResponse:
        return problem_response(exc.to_problem(request.url.path), exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = _PHRASES.get(exc.status_code, "Error")
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title else None
        problem = Problem(title=title, status=exc.status_code, detail=detail, instance=request.url.path)
        headers = dict(exc.headers) if exc.headers else {}
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(app, request.scope))
        return problem_response(problem, headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problem = Problem(
            type=_TYPE_PREFIX + "validation",
            title="Request is not valid",
            status=422,
            detail="see `errors` for each invalid field",
            instance=request.url.path,
            errors=_json_safe_errors(exc.errors()),
        )
        return problem_response(problem)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        problem = Problem(
            type=_TYPE_PREFIX + "internal",
            title="Internal Server Error",
            status=500,
            detail="an unexpected error occurred; see the server log",
            instance=request.url.path,
        )
        return problem_response(problem)
