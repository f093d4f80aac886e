"""The HTTP layer of ``cpp serve`` on a real socket (loopback): header size limit and body read timeout."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from service_testing import CountingEncoderFactory, FakePipeline

from cpp.service.app import create_app
from cpp.service.server import server_config
from cpp.service.settings import Settings


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def server(settings: Settings) -> Iterator[int]:
    """``cpp serve``'s uvicorn configuration over the scripted pipeline, on a free loopback port."""
    limited = settings.model_copy(update={"max_header_bytes": 8192, "body_timeout_s": 0.5})
    app = create_app(limited, pipeline=FakePipeline(), encoder_factory=CountingEncoderFactory())
    port = _free_port()
    config = server_config(limited, host="127.0.0.1", port=port, log_level="warning", app=app)
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not instance.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield port
    instance.should_exit = True
    thread.join(10)


def _exchange(port: int, request: bytes, timeout: float = 5.0) -> tuple[bytes, float]:
    """Send ``request``, read until the server closes or answers; the answer and the seconds it took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it may close while we send
            conn.sendall(request)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer:
                    break
    return answer, time.monotonic() - started


def test_a_normal_request_is_served(server: int) -> None:
    answer, _ = _exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")


def test_oversized_headers_are_refused_at_once(server: int) -> None:
    huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n"
    answer, seconds = _exchange(server, huge)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200]
    assert seconds < 3
    ok, _ = _exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")  # the server is not stalled by it


def test_a_body_shorter_than_its_length_times_out(server: int) -> None:
    request = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 500\r\nConnection: close\r\n\r\n{"source": '
    )
    answer, seconds = _exchange(server, request)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert seconds < 4
