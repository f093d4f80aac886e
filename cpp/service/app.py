"""The FastAPI app factory: settings, job store, workers, routes and problem handlers."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import cpp
from cpp.logging import disable_progress_bars, get_logger
from cpp.service.api.deps import Services, require_api_key
from cpp.service.api.routes import clusterings, curation, health, jobs, ui
from cpp.service.metrics import ServiceMetrics
from cpp.service.problems import PROBLEM_JSON, Problem, install_problem_handlers
from cpp.service.settings import Settings
from cpp.service.store import JobKind, JobStatus, open_store
from cpp.service.uploads import STAGING_DIR, remove_orphans
from cpp.service.worker import EncoderFactory, Pipeline, Worker, library_encoder_factory, library_pipeline

log = get_logger("service")

UPLOAD_PATH = "/v1/jobs/upload"
#: Paths of upload requests, which may carry up to ``max_upload_bytes`` (new images for a clustering too).
_UPLOAD_PATHS = re.compile(r"^/v1/(jobs|clusterings/[0-9a-f]{32}/assignments)/upload$")
_MULTIPART_OVERHEAD = 1024 * 1024


class RequestGuard:
    """Pure ASGI middleware: body-size limits from ``Content-Length`` (413/411), a deadline for each part of
    the body (408 when ``CPP_BODY_TIMEOUT_S`` passes without one), and request metrics."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: ServiceMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        rejection = self._check_body(scope)
        if rejection is not None:
            await self._reject(rejection, scope, send_wrapper)
        else:
            await self.app(scope, self._timed(receive), send_wrapper)
        handler = getattr(scope.get("endpoint"), "__name__", "unmatched")
        self.metrics.requests.inc(scope["method"], handler, str(status_code))
        self.metrics.latency.observe(time.perf_counter() - started, scope["method"], handler)

    def _timed(self, receive: Receive) -> Receive:
        """``receive`` that gives up on a body part after ``body_timeout_s`` (then waits as usual, e.g. for
        the client to disconnect, once the body is complete)."""
        timeout = self.settings.body_timeout_s
        complete = False

        async def timed_receive() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except asyncio.TimeoutError:  # not the built-in TimeoutError before Python 3.11
                raise StarletteHTTPException(
                    408, f"no part of the request body arrived for {timeout:g} s (CPP_BODY_TIMEOUT_S)"
                ) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return timed_receive

    def _check_body(self, scope: Scope) -> Problem | None:
        headers = dict(scope["headers"])
        limit = (
            self.settings.max_upload_bytes + _MULTIPART_OVERHEAD
            if _UPLOAD_PATHS.match(scope["path"])
            else self.settings.max_json_bytes
        )
        length = headers.get(b"content-length")
        if length is None:
            if headers.get(b"transfer-encoding") is not None:
                return Problem(
                    title="Length Required", status=411, detail="send a Content-Length header with the body"
                )
            return None
        if not length.isdigit():
            return Problem(title="Bad Request", status=400, detail="Content-Length is not a number")
        if int(length) > limit:
            return Problem(
                type="urn:cpp:problem:upload-too-large"
                if _UPLOAD_PATHS.match(scope["path"])
                else "about:blank",
                title="Content Too Large",
                status=413,
                detail=f"the request body is over {limit} bytes",
            )
        return None

    @staticmethod
    async def _reject(problem: Problem, scope: Scope, send: Send) -> None:
        problem.instance = scope["path"]
        body = problem.model_dump_json(exclude_none=True).encode()
        headers = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": problem.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _document_this_server(app: FastAPI, settings: Settings) -> None:
    """Make the OpenAPI schema say what this server accepts: its devices, its upload file count and, on a
    service without keys, no security schemes and no 401 answers."""
    build = app.openapi
    keyless = not settings.api_keys and not settings.admin_keys

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()  # cached by FastAPI in app.openapi_schema; adjusted in place once
        components = schema["components"]
        for options in ("ClusterOptions", "AssignOptions"):
            device = components["schemas"][options]["properties"]["device"]
            device.pop("pattern", None)
            device["enum"] = list(dict.fromkeys(["auto", *settings.devices]))
        upload = schema["paths"][UPLOAD_PATH]["post"]["requestBody"]["content"]["multipart/form-data"]
        upload["schema"]["properties"]["files"].update(minItems=1, maxItems=settings.max_upload_files)
        if keyless:
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.pop("security", None)
                    operation["responses"].pop("401", None)
            components.pop("securitySchemes", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _start_services(
    settings: Settings,
    metrics: ServiceMetrics,
    pipeline: Pipeline | None,
    encoder_factory: EncoderFactory | None,
) -> Services:
    """Open the job store, tidy what killed runs left, and start a worker per device (if workers run)."""
    settings.jobs_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(settings.database_url, settings.sqlite_path)
    if store.single_process and settings.run_workers:
        resumed = store.requeue_running()
        if resumed:
            log.info("re-queued %d job(s) that were running when the service stopped", resumed)
    removed = remove_orphans(
        settings.data_dir / STAGING_DIR,
        settings.jobs_dir,
        lambda job_id: store.get(job_id) is not None,
        # A shared store: another process may have moved an upload into place and not yet added
        # its row; the folder's mtime is fresh then (StagedUpload.publish).
        0.0 if store.single_process else settings.lease_s,
        assignment_exists=lambda job_id: store.get(job_id, kind=JobKind.assign) is not None,
    )
    if removed:
        log.info("removed %d folder(s) left by killed uploads or deleted jobs", len(removed))
    services = Services(settings, store, pipeline or library_pipeline(), metrics)
    if settings.run_workers:
        _start_workers(services, encoder_factory or library_encoder_factory)
    return services


def _start_workers(services: Services, factory: EncoderFactory) -> None:
    """One worker per configured device, each counting what it finishes in the metrics."""
    settings, metrics = services.settings, services.metrics

    def finished(status: JobStatus, seconds: float) -> None:
        metrics.jobs_finished.inc(status.value)
        metrics.job_duration.observe(seconds)

    for device in settings.devices:
        worker = Worker(
            services.store,
            settings.jobs_dir,
            device,
            pipeline=services.pipeline,
            encoder_factory=factory,
            allowed_roots=settings.allowed_roots,
            poll_interval_s=settings.poll_interval_s,
            lease_s=settings.lease_s,
            nice=settings.worker_nice,
            on_finish=finished,
        )
        worker.start()
        services.workers.append(worker)


def create_app(
    settings: Settings | None = None,
    *,
    pipeline: Pipeline | None = None,
    encoder_factory: EncoderFactory | None = None,
) -> FastAPI:
    """Build the service app; ``pipeline`` and ``encoder_factory`` default to the library's."""
    settings = settings or Settings()
    disable_progress_bars()
    holder: dict[str, Services] = {}

    def jobs_by_status() -> dict[tuple[str, ...], float]:
        services = holder.get("services")
        if services is None:
            return {}
        return {(status.value,): float(n) for status, n in services.store.counts().items()}

    metrics = ServiceMetrics(jobs_by_status)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = _start_services(settings, metrics, pipeline, encoder_factory)
        holder["services"] = services
        app.state.services = services
        try:
            yield
        finally:
            for worker in services.workers:
                worker.stop()
            services.store.close()

    app = FastAPI(
        title="cpp job service",
        version=cpp.__version__,
        description="Cluster image collections and name the clusters (CPP rate reduction + CRATE head). "
        "Jobs run in the background; results use the same schema as `cpp cluster`. "
        "Errors are RFC 9457 problem documents (`application/problem+json`).",
        lifespan=lifespan,
    )
    install_problem_handlers(app)
    _document_this_server(app, settings)
    app.add_middleware(RequestGuard, settings=settings, metrics=metrics)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
    v1.include_router(jobs.router)
    v1.include_router(clusterings.router)
    v1.include_router(curation.router)
    app.include_router(v1)
    app.include_router(health.router)
    app.include_router(ui.router)
    return app
