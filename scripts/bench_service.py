"""Benchmark the job service over loopback and print JSON.

1. ``direct``: ``run_cluster`` called in this process on N CIFAR-10 test images (encoder built beforehand).
2. ``api``: the same job through a ``cpp serve`` subprocess on 127.0.0.1, polled twice a second; the job
   time is the server's ``finished_at - created_at`` (queueing included). A small warm-up job loads the
   encoder first, as it stays loaded in a running service.
3. ``poll``: while a third, identical job runs, ``GET /v1/jobs/{id}`` is sent open-loop at ``--rate``
   requests per second (bounded by ``--max-requests`` and ``--max-seconds``); latency p50/p99/max.
4. ``queued``: ``--queued`` jobs are submitted at once (one runs, the rest wait), and the status of one
   queued job is polled the same way for ``--queued-seconds``; then they are all cancelled.

Usage: python scripts/bench_service.py [--images 400] [--rate 200] [--queued 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from loopback import free_port, start_server

DATASET = Path("/work/shared/datasets/cifar10/test")
MODEL = "effnet-lite0-in1k"


def write_list(root: Path, count: int, path: Path) -> None:
    """A file list of ``count`` images spread evenly over the class folders."""
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    per_class = -(-count // len(classes))
    files = [f for c in classes for f in sorted(c.glob("*.jpg"))[:per_class]][:count]
    path.write_text("".join(f"{f}\n" for f in files))


def start_job_server(data_dir: Path, roots: list[Path], port: int, log: Path) -> subprocess.Popen[bytes]:
    settings = {
        "CPP_DATA_DIR": str(data_dir),
        "CPP_ALLOWED_ROOTS": ",".join(map(str, roots)),
        "CPP_MODEL": MODEL,
        "CPP_DEVICES": "cpu",
    }
    return start_server(settings, port, log)


def wait_done(client: httpx.Client, job_id: str, interval: float = 0.5) -> dict[str, Any]:
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
        time.sleep(interval)
    if job["status"] != "succeeded":
        raise SystemExit(f"job {job_id} ended {job['status']}: {job.get('error')}")
    return job


def job_seconds(job: dict[str, Any]) -> float:
    created = datetime.fromisoformat(job["created_at"])
    finished = datetime.fromisoformat(job["finished_at"])
    return (finished - created).total_seconds()


class _Connection:
    """A minimal keep-alive HTTP/1.1 GET client on raw asyncio streams (httpx costs more CPU per request
    than the server does, so it would measure itself)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def get(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return status, await self.reader.readexactly(length)


async def poll(
    port: int, job_id: str, rate: float, max_requests: int, max_seconds: float, until_done: bool = True
) -> dict[str, Any]:
    """Open-loop GETs at ``rate``/s until the job ends (``until_done``) or the bounds; latencies in ms.

    Each request is timed from its scheduled send time, so a server that falls behind is charged for the
    queueing it causes.
    """
    request = f"GET /v1/jobs/{job_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    idle: asyncio.Queue[_Connection] = asyncio.Queue()
    for _ in range(32):
        idle.put_nowait(_Connection(*await asyncio.open_connection("127.0.0.1", port)))
    latencies: list[float] = []
    errors = 0
    finished = asyncio.Event()

    async def one(scheduled: float) -> None:
        nonlocal errors
        connection = await idle.get()
        try:
            status, body = await connection.get(request)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            return
        latencies.append((time.perf_counter() - scheduled) * 1000)
        idle.put_nowait(connection)
        if status != 200:
            errors += 1
        elif until_done and json.loads(body)["status"] not in ("queued", "running"):
            finished.set()

    tasks = []
    t0 = time.perf_counter()
    for i in range(max_requests):
        if finished.is_set() or time.perf_counter() - t0 > max_seconds:
            break
        scheduled = t0 + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    while not idle.empty():
        idle.get_nowait().writer.close()
    values = np.array(latencies)
    return {
        "rate_target": rate,
        "rate_achieved": round(len(tasks) / elapsed, 1),
        "requests": len(tasks),
        "errors": errors,
        "p50_ms": round(float(np.percentile(values, 50)), 2),
        "p99_ms": round(float(np.percentile(values, 99)), 2),
        "max_ms": round(float(values.max()), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--max-requests", type=int, default=30_000)
    parser.add_argument("--max-seconds", type=float, default=150.0)
    parser.add_argument("--repeats", type=int, default=3, help="direct/API run pairs")
    parser.add_argument("--dataset", type=Path, default=DATASET)
    parser.add_argument("--queued", type=int, default=20, help="jobs submitted at once for the queued case")
    parser.add_argument("--queued-seconds", type=float, default=60.0, help="how long the queued case polls")
    args = parser.parse_args()

    import torch

    from cpp.encoders import create_encoder
    from cpp.options import ClusterOptions, SourceSpec
    from cpp.pipeline import run_cluster

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="bench_service_"))
    listing = work / "images.txt"
    write_list(args.dataset, args.images, listing)
    warm = work / "warm.txt"
    write_list(args.dataset, 20, warm)
    options = {"model": MODEL, "clusters": 10, "seed": 0, "device": "cpu"}

    port = free_port()
    server = start_job_server(work / "data", [work, args.dataset.resolve()], port, work / "server.log")
    encoder = create_encoder(MODEL, device="cpu")
    direct: list[float] = []
    api: list[float] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            warm_body = {
                "source": {"type": "files", "path": str(warm)},
                "options": {**options, "clusters": 2},
            }
            wait_done(client, client.post("/v1/jobs", json=warm_body).json()["id"])
            body = {"source": {"type": "files", "path": str(listing)}, "options": options}
            # Alternate direct and API runs so drifting load on a shared machine hits both alike.
            for repeat in range(args.repeats):
                started = time.perf_counter()
                run_cluster(
                    SourceSpec(type="files", path=str(listing)),
                    ClusterOptions.model_validate(options),
                    work / f"direct{repeat}",
                    encoder=encoder,
                )
                direct.append(time.perf_counter() - started)
                job = client.post("/v1/jobs", json={**body, "options": {**options, "seed": 0}}).json()
                api.append(job_seconds(wait_done(client, job["id"])))
            polled_id = client.post("/v1/jobs", json={**body, "options": {**options, "seed": 1}}).json()["id"]
            poll_stats = asyncio.run(poll(port, polled_id, args.rate, args.max_requests, args.max_seconds))
            polled_job = wait_done(client, polled_id)
            queued_ids = [
                client.post("/v1/jobs", json={**body, "options": {**options, "seed": 100 + i}}).json()["id"]
                for i in range(args.queued)
            ]
            queued_poll = poll(
                port, queued_ids[-1], args.rate, args.max_requests, args.queued_seconds, until_done=False
            )
            queued_stats = asyncio.run(queued_poll)
            statuses = [client.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in queued_ids]
            queued_stats["statuses_at_end"] = {s: statuses.count(s) for s in sorted(set(statuses))}
            for job_id in queued_ids:
                client.post(f"/v1/jobs/{job_id}/cancel")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    machine = (
        f"{platform.node()}: {os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}"
    )
    print(
        json.dumps(
            {
                "machine": machine,
                "worker_nice": os.environ.get("CPP_WORKER_NICE", "10 (default)"),
                "images": args.images,
                "model": MODEL,
                "direct_run_cluster_s": [round(t, 2) for t in direct],
                "api_job_s": [round(t, 2) for t in api],
                "overhead_pct_of_medians": round(100 * (np.median(api) / np.median(direct) - 1), 1),
                "overhead_pct_of_minima": round(100 * (min(api) / min(direct) - 1), 1),
                "poll_while_running": poll_stats,
                "polled_job_s": round(job_seconds(polled_job), 2),
                "poll_with_queued_jobs": {"queued_jobs": args.queued, **queued_stats},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
