"""Helpers of the service tests: a scripted stand-in for the library calls and polling/problem checks.

The stand-in (:class:`FakePipeline`) lets API behaviour (status changes, progress, cancellation, restarts)
be tested in milliseconds; test_service_e2e.py runs the real pipeline.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from cpp.errors import SourceError
from cpp.options import ClusterOptions, SourceSpec
from cpp.progress import RunControl
from cpp.result import Assignment, Cluster, ClusterResult, Counts, KSelection, RunInfo
from cpp.sources import IMAGE_EXTENSIONS, Roots


class FakePipeline:
    """Embeds nothing: reports ``batches`` progress steps, then writes a two-cluster result of the folder.

    ``release`` gates each batch (clear it to hold a job in the running state).
    """

    def __init__(self, batches: int = 3) -> None:
        self.batches = batches
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()
        self.calls: list[tuple[SourceSpec, ClusterOptions, Path]] = []
        self.roots: list[Roots] = []
        self.niceness: list[int] = []

    def run_cluster(
        self,
        source: SourceSpec,
        options: ClusterOptions,
        work_dir: str | Path,
        *,
        control: RunControl | None = None,
        encoder: Any = None,
        roots: Roots = None,
    ) -> ClusterResult:
        control = control or RunControl()
        work_dir = Path(work_dir)
        self.calls.append((source, options, work_dir))
        self.roots.append(roots)
        self.niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        root = Path(source.path)
        stage = control.stage("embed", self.batches)
        self.started.set()
        for _ in range(self.batches):
            while not self.release.wait(0.01):
                control.check_cancelled()
            stage.advance(1)
        if not root.is_dir():
            raise SourceError(f"image folder {source.path!r} does not exist")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        assignments = [
            Assignment(key=p.relative_to(root).as_posix(), path=str(p), cluster=i % 2, confidence=0.9)
            for i, p in enumerate(files)
        ]
        result = ClusterResult(
            run=RunInfo(
                encoder={"id": options.model},
                head={"type": options.head},
                k_selection=KSelection(method="fixed", k=2),
                counts=Counts(items=len(files), embedded=len(files), skipped=0),
                created_at=datetime.now(timezone.utc).isoformat(),
            ),
            clusters=[
                Cluster(
                    id=j,
                    size=sum(a.cluster == j for a in assignments),
                    name=f"c{j}",
                    score=0.5,
                    uncertain=False,
                )
                for j in range(2)
            ],
            assignments=assignments,
        )
        (work_dir / "result.json").write_text(result.model_dump_json())
        return result

    def read_assignments(
        self, work_dir: str | Path, *, offset: int = 0, limit: int = 100
    ) -> tuple[list[Assignment], int]:
        result = ClusterResult.model_validate_json((Path(work_dir) / "result.json").read_text())
        items = result.assignments or []
        return items[offset : offset + limit], len(items)


class CountingEncoderFactory:
    """Counts encoder builds (the worker should build each spec once)."""

    def __init__(self) -> None:
        self.built: list[tuple[str, str]] = []

    def __call__(self, spec: str, device: str) -> Any:
        self.built.append((spec, device))
        return object()


def wait_for(
    client: TestClient,
    job_id: str,
    done: Callable[[dict[str, Any]], bool],
    timeout: float = 10,
    headers: dict[str, str] | None = None,
) -> dict:
    """Poll GET /v1/jobs/{id} until ``done(job)``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if done(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} never reached the expected state: {json.dumps(job)}")
        time.sleep(0.02)


def wait_status(
    client: TestClient,
    job_id: str,
    *statuses: str,
    timeout: float = 10,
    headers: dict[str, str] | None = None,
) -> dict:
    return wait_for(client, job_id, lambda job: job["status"] in statuses, timeout, headers)


PROBLEM = "application/problem+json"


def assert_problem(response: Any, status: int, kind: str | None = None) -> dict[str, Any]:
    """Check ``response`` is an RFC 9457 problem with ``status`` (and type ``urn:cpp:problem:<kind>``)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status and problem["title"]
    if kind is not None:
        assert problem["type"] == f"urn:cpp:problem:{kind}"
    return problem
