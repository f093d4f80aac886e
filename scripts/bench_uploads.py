"""Peak memory of the job service under concurrent uploads; prints JSON.

Starts ``cpp serve`` (API only: ``CPP_RUN_WORKERS=false``, so no job runs) on 127.0.0.1 in a subprocess,
sends ``--uploads`` concurrent ``POST /v1/jobs/upload`` requests of ``--mb`` MB each and samples the
server's ``VmRSS`` and ``VmHWM`` (peak resident set) from ``/proc/PID/status``. Each upload is either
``files`` (noise PNGs of about ``--part-kb`` KB each: parts under 1 MiB are the ones Starlette's form
parser keeps in memory) or ``zip`` (one stored zip of such PNGs, written to a temporary folder first).
Bodies are streamed from a generator with a Content-Length, so the client holds one image at a time.

Usage: python scripts/bench_uploads.py [--mb 1024] [--uploads 3] [--kind files|zip] [--part-kb 512]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import shutil
import signal
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from loopback import free_port, start_server
from PIL import Image

MiB = 1024 * 1024
BOUNDARY = "bench-uploads-boundary-5b1f"


def noise_pngs(part_kb: int, count: int = 4) -> list[bytes]:
    """``count`` distinct PNGs of random RGB pixels (incompressible), each about ``part_kb`` KB."""
    side = max(8, int((part_kb * 1024 / 3) ** 0.5))
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def _part_head(name: str) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


_TAIL = (
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="options"\r\n\r\n{{}}\r\n--{BOUNDARY}--\r\n'
).encode()


class Body:
    """A multipart body of named payloads, with its length known before it is generated."""

    def __init__(self, names: list[str], sizes: list[int], chunks: Any) -> None:
        self.length = sum(len(_part_head(n)) + s + 2 for n, s in zip(names, sizes, strict=True)) + len(_TAIL)
        self._names = names
        self._chunks = chunks  # callable: index -> iterator of bytes

    def __iter__(self) -> Iterator[bytes]:
        for i, name in enumerate(self._names):
            yield _part_head(name)
            yield from self._chunks(i)
            yield b"\r\n"
        yield _TAIL


def files_body(images: list[bytes], total: int) -> tuple[Body, int]:
    count = max(1, total // len(images[0]))
    names = [f"img{i:06d}.png" for i in range(count)]
    sizes = [len(images[i % len(images)]) for i in range(count)]
    return Body(names, sizes, lambda i: iter((images[i % len(images)],))), count


def zip_body(images: list[bytes], total: int, folder: Path) -> tuple[Body, int]:
    count = max(1, total // len(images[0]))
    path = folder / "upload.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for i in range(count):
            archive.writestr(f"set/{i % 10}/img{i:06d}.png", images[i % len(images)])

    def chunks(_: int) -> Iterator[bytes]:
        with open(path, "rb") as src:
            while chunk := src.read(MiB):
                yield chunk

    return Body(["upload.zip"], [path.stat().st_size], chunks), count


def send(port: int, body: Body, result: dict[str, Any]) -> None:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.putrequest("POST", "/v1/jobs/upload")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={BOUNDARY}")
        conn.putheader("Content-Length", str(body.length))
        conn.endheaders()
        for chunk in body:
            conn.send(chunk)
        response = conn.getresponse()
        payload = response.read()
        result["status"] = response.status
        if response.status >= 300:
            result["error"] = payload.decode(errors="replace")[:300]
    except OSError as exc:
        result["status"] = None
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
        result["seconds"] = round(time.perf_counter() - started, 2)


def proc_status(pid: int) -> dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def start_upload_server(data_dir: Path, port: int, max_bytes: int, max_files: int, log: Path) -> Any:
    settings = {
        "CPP_DATA_DIR": str(data_dir),
        "CPP_RUN_WORKERS": "false",
        "CPP_MAX_UPLOAD_BYTES": str(max_bytes),
        "CPP_MAX_UPLOAD_FILES": str(max_files),
    }
    return start_server(settings, port, log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024, help="size of each upload in MB (MiB)")
    parser.add_argument("--uploads", type=int, default=3, help="concurrent uploads")
    parser.add_argument("--kind", choices=["files", "zip"], default="files")
    parser.add_argument("--part-kb", type=int, default=512, help="approximate size of each image")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="folder for data")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_uploads_", dir=args.tmp))
    try:
        images = noise_pngs(args.part_kb)
        total = args.mb * MiB
        bodies = []
        for i in range(args.uploads):
            if args.kind == "files":
                bodies.append(files_body(images, total))
            else:
                folder = work / f"client{i}"
                folder.mkdir()
                bodies.append(zip_body(images, total, folder))
        port = free_port()
        max_bytes = total + 16 * MiB
        server = start_upload_server(work / "data", port, max_bytes, bodies[0][1] + 1, work / "server.log")
        try:
            baseline = proc_status(server.pid)
            peak_rss = baseline["VmRSS"]
            results: list[dict[str, Any]] = [{} for _ in bodies]
            threads = [
                threading.Thread(target=send, args=(port, body, result))
                for (body, _), result in zip(bodies, results, strict=True)
            ]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            while any(t.is_alive() for t in threads):
                peak_rss = max(peak_rss, proc_status(server.pid)["VmRSS"])
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
            final = proc_status(server.pid)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
        sent = sum(body.length for body, _ in bodies)
        print(
            json.dumps(
                {
                    "kind": args.kind,
                    "uploads": args.uploads,
                    "mb_each": args.mb,
                    "images_each": bodies[0][1],
                    "image_bytes": len(images[0]),
                    "statuses": [r.get("status") for r in results],
                    "errors": [r["error"] for r in results if "error" in r],
                    "seconds_each": [r.get("seconds") for r in results],
                    "wall_s": round(elapsed, 2),
                    "throughput_mb_s": round(sent / MiB / elapsed, 1),
                    "server_rss_start_mb": round(baseline["VmRSS"] / MiB, 1),
                    "server_rss_sampled_peak_mb": round(peak_rss / MiB, 1),
                    "server_vmhwm_mb": round(final["VmHWM"] / MiB, 1),
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                },
                indent=2,
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
