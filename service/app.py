"""The FastAPI app factory: settings, job store, workers, routes and problem handlers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import cpp
from cpp.logging import disable_progress_bars, get_logger
from service.api.deps import Services, require_api_key
from service.api.routes import health, jobs
from service.metrics import ServiceMetrics
from service.problems import PROBLEM_JSON, Problem, install_problem_handlers
from service.settings import Settings
from service.store import JobStatus, open_store
from service.worker import EncoderFactory, Pipeline, Worker, library_encoder_factory, library_pipeline

log = get_logger("service")

UPLOAD_PATH = "/v1/jobs/upload"
_MULTIPART_OVERHEAD = 1024 * 1024


class RequestGuard:
    """Pure ASGI middleware: body-size limits from ``Content-Length`` (413/411) and request metrics."""

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
            await self.app(scope, receive, send_wrapper)
        handler = getattr(scope.get("endpoint"), "__name__", "unmatched")
        self.metrics.requests.inc(scope["method"], handler, str(status_code))
        self.metrics.latency.observe(time.perf_counter() - started, scope["method"], handler)

    def _check_body(self, scope: Scope) -> Problem | None:
        headers = dict(scope["headers"])
        limit = (
            self.settings.max_upload_bytes + _MULTIPART_OVERHEAD
            if scope["path"] == UPLOAD_PATH
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
                type="urn:cpp:problem:upload-too-large" if scope["path"] == UPLOAD_PATH else "about:blank",
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
        settings.jobs_dir.mkdir(parents=True, exist_ok=True)
        store = open_store(settings.database_url, settings.sqlite_path)
        if store.single_process and settings.run_workers:
            resumed = store.requeue_running()
            if resumed:
                log.info("re-queued %d job(s) that were running when the service stopped", resumed)
        services = Services(settings, store, pipeline or library_pipeline(), metrics)

        def finished(status: JobStatus, seconds: float) -> None:
            metrics.jobs_finished.inc(status.value)
            metrics.job_duration.observe(seconds)

        if settings.run_workers:
            factory = encoder_factory or library_encoder_factory
            for device in settings.devices:
                worker = Worker(
                    store,
                    settings.jobs_dir,
                    device,
                    pipeline=services.pipeline,
                    encoder_factory=factory,
                    poll_interval_s=settings.poll_interval_s,
                    lease_s=settings.lease_s,
                    nice=settings.worker_nice,
                    on_finish=finished,
                )
                worker.start()
                services.workers.append(worker)
        holder["services"] = services
        app.state.services = services
        try:
            yield
        finally:
            for worker in services.workers:
                worker.stop()
            store.close()

    app = FastAPI(
        title="cpp job service",
        version=cpp.__version__,
        description="Cluster image collections and name the clusters (CPP rate reduction + CRATE head). "
        "Jobs run in the background; results use the same schema as `cpp cluster`. "
        "Errors are RFC 9457 problem documents (`application/problem+json`).",
        lifespan=lifespan,
    )
    install_problem_handlers(app)
    app.add_middleware(RequestGuard, settings=settings, metrics=metrics)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
    v1.include_router(jobs.router)
    app.include_router(v1)
    app.include_router(health.router)
    return app
