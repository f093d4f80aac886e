"""``cpp serve`` in a subprocess on 127.0.0.1, for the service benchmarks (imported by them, not run)."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(settings: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """Start ``cpp serve`` with ``settings`` (``CPP_*`` variables) and wait until ``/readyz`` answers 200;
    its output goes to ``log``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **settings}
    command = [sys.executable, "-c", "import sys; from cpp.cli import main; sys.exit(main())", "serve"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not start; see {log}:\n{log.read_text()[-2000:]}")
