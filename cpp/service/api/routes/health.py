"""Liveness, readiness and Prometheus metrics (no API key needed)."""

from __future__ import annotations

import os

from fastapi import APIRouter, Response

from cpp.service.api.deps import ServicesDep
from cpp.service.api.schemas import Health
from cpp.service.metrics import CONTENT_TYPE
from cpp.service.problems import ApiProblem, problem_responses

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
def healthz() -> Health:
    """The process answers."""
    return Health(status="ok")


@router.get("/readyz", summary="Readiness", responses=problem_responses(503))
def readyz(services: ServicesDep) -> Health:
    """The job store answers, the data folder is writable and the workers are alive."""
    checks: dict[str, str] = {}
    failed: list[str] = []
    try:
        services.store.ping()
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
        failed.append("database")
    jobs_dir = services.settings.jobs_dir
    writable = jobs_dir.is_dir() and os.access(jobs_dir, os.W_OK)
    checks["data_dir"] = "ok" if writable else f"{jobs_dir} is not a writable folder"
    if not writable:
        failed.append("data_dir")
    if services.settings.run_workers:
        alive = sum(w.is_alive() for w in services.workers)
        checks["workers"] = f"{alive} of {len(services.workers)} alive"
        if alive < len(services.workers):
            failed.append("workers")
    if failed:
        raise ApiProblem(
            503, "not-ready", "Service Unavailable", f"failing checks: {', '.join(failed)}", checks=checks
        )
    return Health(status="ready", checks=checks)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format 0.0.4"}},
)
def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)
