"""The browser UI: the page at ``/``, its script and style (served from the package, nothing from a CDN), and
the log-in that puts an API key into an HttpOnly session cookie.

The page and its assets hold no data, so they are served without a key; every piece of data comes from the
``/v1`` API with the same keys as any client. State-changing requests carry a CSRF double-submit token: the
``cpp_csrf`` cookie (set with the page, readable by it) repeated as the ``X-CSRF-Token`` header.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from cpp.gallery import ui_asset
from cpp.service.api.deps import CSRF_COOKIE, SESSION_COOKIE, SettingsDep, check_csrf, key_caller
from cpp.service.problems import ApiProblem, problem_responses

router = APIRouter(tags=["ui"])

#: Where the page may load from and connect to: this server only.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_MEDIA = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
_SESSION_S = 7 * 24 * 3600


def _headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


def _set_csrf(request: Request, response: Response) -> None:
    if not request.cookies.get(CSRF_COOKIE):
        response.set_cookie(
            CSRF_COOKIE,
            secrets.token_urlsafe(32),
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )


@router.get("/", include_in_schema=False)
def index(request: Request) -> HTMLResponse:
    """The single-page UI (jobs, clusterings, clusters, map, run); it asks for a key when one is needed."""
    response = HTMLResponse(ui_asset("index.html"), headers=_headers())
    _set_csrf(request, response)
    return response


class Session(BaseModel):
    keys_required: bool = Field(description="Whether this service needs an API key.")
    signed_in: bool = Field(description="Whether the session cookie holds a valid key.")


@router.get("/ui/session", summary="Whether the browser is signed in", response_model=Session)
def session(request: Request, settings: SettingsDep) -> Session:
    required = bool(settings.api_keys or settings.admin_keys)
    key = request.cookies.get(SESSION_COOKIE)
    return Session(
        keys_required=required,
        signed_in=not required or (key is not None and key_caller(key, settings) is not None),
    )


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=1, max_length=512, description="One of CPP_API_KEYS or CPP_ADMIN_KEYS.")


@router.post(
    "/ui/login",
    summary="Sign the browser in with an API key",
    status_code=204,
    responses=problem_responses(400, 401, 403, 422),
)
def login(request: Request, body: Login, settings: SettingsDep) -> Response:
    """Check the key and keep it in an HttpOnly, SameSite=Strict cookie (CSRF header required)."""
    check_csrf(request)
    if key_caller(body.key, settings) is None:
        raise ApiProblem(401, "unauthorized", "Unauthorized", "the API key is not valid")
    response = Response(status_code=204)
    response.set_cookie(
        SESSION_COOKIE,
        body.key,
        max_age=_SESSION_S,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/ui/logout", summary="Sign the browser out", status_code=204, responses=problem_responses(403))
def logout(request: Request) -> Response:
    check_csrf(request)
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/ui/{name}", include_in_schema=False)  # after /ui/session: it would match that too
def asset(name: Annotated[Literal["app.js", "style.css"], Path()]) -> Response:
    return Response(ui_asset(name), media_type=_MEDIA[name], headers=_headers())
