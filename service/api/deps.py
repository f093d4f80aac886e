"""FastAPI dependencies: the service container, settings, job store and API-key check."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.metrics import ServiceMetrics
from service.problems import ApiProblem
from service.settings import Settings
from service.store import JobStore
from service.worker import Pipeline, Worker


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


def require_api_key(
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_api_key)],
) -> None:
    """Require one of ``CPP_API_KEYS`` when any are configured (401 otherwise)."""
    if not settings.api_keys:
        return
    offered = [k for k in (bearer.credentials if bearer else None, api_key) if k]
    for key in offered:
        if any(hmac.compare_digest(key.encode(), valid.encode()) for valid in settings.api_keys):
            return
    raise ApiProblem(
        401,
        "unauthorized",
        "Unauthorized",
        "send an API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        if not offered
        else "the API key is not valid",
        headers={"WWW-Authenticate": "Bearer"},
    )
