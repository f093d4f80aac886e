"""FastAPI dependencies: the service container, settings, job store and the caller (API-key check)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from cpp.service.metrics import ServiceMetrics
from cpp.service.problems import ApiProblem
from cpp.service.settings import Settings
from cpp.service.store import ANY_OWNER, JobStore, Owner
from cpp.service.worker import Pipeline, Worker


@dataclass
class Services:
    """Everything the routes use, built in the app's lifespan."""

    settings: Settings
    store: JobStore
    pipeline: Pipeline
    metrics: ServiceMetrics
    workers: list[Worker] = field(default_factory=list)

    def wake_workers(self) -> None:
        for worker in self.workers:
            worker.wake()

    def cancel_running(self, job_id: str) -> None:
        """Cancel ``job_id`` now if a worker of this process runs it (others see the store flag)."""
        for worker in self.workers:
            worker.cancel(job_id)


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_settings(services: ServicesDep) -> Settings:
    return services.settings


def get_store(services: ServicesDep) -> JobStore:
    return services.store


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>` (one of CPP_API_KEYS)")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="one of CPP_API_KEYS")


def key_id(key: str) -> str:
    """The id stored with a key's jobs: a digest, so the database never holds the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the id of their API key (None on a service without keys), and whether it is an
    admin key (``CPP_ADMIN_KEYS``), which sees every job."""

    key_id: str | None
    admin: bool = False

    @property
    def sees(self) -> Owner:
        """The ``owner`` argument of job-store reads for this caller."""
        return ANY_OWNER if self.admin or self.key_id is None else self.key_id


def _unauthorized(detail: str) -> ApiProblem:
    return ApiProblem(401, "unauthorized", "Unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


def _matches(key: str, valid: list[str]) -> bool:
    return any(hmac.compare_digest(key.encode(), other.encode()) for other in valid)


#: The browser UI's session cookie (HttpOnly, holds the API key) and its CSRF double-submit token: a cookie
#: the page reads and sends back as the :data:`CSRF_HEADER` header with every state-changing request.
SESSION_COOKIE = "cpp_session"
CSRF_COOKIE = "cpp_csrf"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def check_csrf(request: Request) -> None:
    """Refuse (403) a state-changing request whose CSRF header does not match its CSRF cookie."""
    if request.method in SAFE_METHODS:
        return
    cookie, header = request.cookies.get(CSRF_COOKIE, ""), request.headers.get(CSRF_HEADER, "")
    if not cookie or not hmac.compare_digest(cookie.encode(), header.encode()):
        raise ApiProblem(
            403,
            "csrf",
            "CSRF check failed",
            f"send the {CSRF_COOKIE} cookie's value as the {CSRF_HEADER} header",
        )


def key_caller(key: str, settings: Settings) -> Caller | None:
    """The caller that ``key`` identifies, or None when it is not a valid key."""
    if _matches(key, settings.admin_keys):
        return Caller(key_id(key), admin=True)
    if _matches(key, settings.api_keys):
        return Caller(key_id(key))
    return None


def require_api_key(
    request: Request,
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_api_key)],
) -> Caller:
    """Require one of ``CPP_API_KEYS`` or ``CPP_ADMIN_KEYS`` when any are configured (401 otherwise).

    Two different credentials in one request are refused, even if one of them is valid, and so is an
    ``Authorization`` header that is not ``Bearer <key>``. Without a key header, the browser UI's session
    cookie is accepted, and then a state-changing request must pass :func:`check_csrf`.
    """
    if not settings.api_keys and not settings.admin_keys:
        return Caller(None)
    if bearer is None and "authorization" in request.headers:
        raise _unauthorized("the Authorization header must be 'Bearer <key>'")
    offered = [k for k in (bearer.credentials if bearer else None, api_key) if k]
    session = request.cookies.get(SESSION_COOKIE)
    if not offered and session:
        check_csrf(request)
        offered = [session]
    if not offered:
        raise _unauthorized("send an API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    if len(set(offered)) > 1:
        raise _unauthorized("the request carries two different API keys; send one")
    caller = key_caller(offered[0], settings)
    if caller is None:
        raise _unauthorized("the API key is not valid")
    return caller


CallerDep = Annotated[Caller, Depends(require_api_key)]
