"""Running the app on uvicorn with limits a public server needs: header size, idle and body-read timeouts.

uvicorn's default HTTP parser (httptools) accepts headers of any size, so the server uses h11, which
refuses a request whose head exceeds ``CPP_MAX_HEADER_BYTES`` (uvicorn answers 400 and closes). A request
body that stops arriving (a ``Content-Length`` larger than what is sent, a stalled upload) is ended by
:class:`~cpp.service.app.RequestGuard` after ``CPP_BODY_TIMEOUT_S`` with 408.
"""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from cpp.service.app import create_app
from cpp.service.settings import Settings


def server_config(
    settings: Settings, *, host: str, port: int, log_level: str = "info", app: FastAPI | None = None
) -> uvicorn.Config:
    """The uvicorn configuration ``cpp serve`` runs (``app``: default ``create_app(settings)``)."""
    return uvicorn.Config(
        app or create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        http="h11",
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=30,
    )


def serve(settings: Settings, *, host: str, port: int, log_level: str = "info") -> None:
    """Serve the job API until interrupted."""
    uvicorn.Server(server_config(settings, host=host, port=port, log_level=log_level)).run()
