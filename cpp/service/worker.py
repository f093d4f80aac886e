"""Background workers: each runs queued jobs one at a time on its device, with encoders loaded once.

A worker thread claims a job, calls ``run_cluster`` on the job's work directory (a cluster job) or
``cpp.assign.assign`` with the clustering of the job's parent (an assignment job, whose folder lies in the
parent's: ``jobs/<parent>/assign/<id>``), reading only under the allowed roots and the job's own folder,
and records the outcome.
A monitor thread beside it writes progress and heartbeats to the store and turns a cancel request seen in
the store (from any process) into ``RunControl.cancel_event``, which the library checks between batches.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, cast

from cpp.encoders.base import Encoder
from cpp.errors import CppError
from cpp.logging import get_logger
from cpp.options import AssignOptions, ClusterOptions, SourceSpec
from cpp.progress import Cancelled, ProgressEvent, RunControl
from cpp.result import Assignment, ClusterResult
from cpp.service.store import JobKind, JobRecord, JobStatus, JobStore
from cpp.sources import Roots, confine_roots

log = get_logger("cpp.service.worker")

EncoderFactory = Callable[[str, str], Encoder]
FinishCallback = Callable[[JobStatus, float], None]


class Pipeline(Protocol):
    """The two library calls the service wraps (``cpp.pipeline`` satisfies it)."""

    def run_cluster(
        self,
        source: SourceSpec,
        options: ClusterOptions,
        work_dir: str | Path,
        *,
        control: RunControl | None = None,
        encoder: Encoder | None = None,
        roots: Roots = None,
    ) -> ClusterResult: ...

    def read_assignments(
        self, work_dir: str | Path, *, offset: int = 0, limit: int = 100
    ) -> tuple[list[Assignment], int]: ...


class Assign(Protocol):
    """The library call of assignment jobs (:func:`cpp.assign.assign`)."""

    def __call__(
        self,
        clustering: Path,
        source: SourceSpec,
        work_dir: Path,
        *,
        options: AssignOptions,
        encoder: Encoder,
        control: RunControl,
        roots: Roots,
    ) -> object: ...


#: Where an assignment job's files lie inside its clustering's job folder.
ASSIGN_DIR = "assign"


def assignment_folder(jobs_dir: Path, clustering_id: str, job_id: str) -> Path:
    """The folder of assignment job ``job_id`` of the clustering of job ``clustering_id``."""
    return jobs_dir / clustering_id / ASSIGN_DIR / job_id


def job_folder(jobs_dir: Path, job: JobRecord) -> Path:
    """The folder of ``job``: ``jobs/<id>``, or ``jobs/<parent>/assign/<id>`` for an assignment job."""
    if job.kind is JobKind.assign and job.parent is not None:
        return assignment_folder(jobs_dir, job.parent, job.id)
    return jobs_dir / job.id


def library_assign() -> Assign:
    """The real assignment call (imported on first use)."""
    from cpp.assign import assign

    return assign


def library_pipeline() -> Pipeline:
    """The real library calls (imported on first use)."""
    import cpp.pipeline

    return cast(Pipeline, cpp.pipeline)


def library_encoder_factory(spec: str, device: str) -> Encoder:
    from cpp.encoders import create_encoder

    return create_encoder(spec, device=device)


def job_failure(exc: BaseException) -> dict[str, Any]:
    """The problem document stored on a failed job."""
    if isinstance(exc, CppError):
        return {
            "type": "urn:cpp:problem:bad-input",
            "title": "The job's input cannot be used",
            "status": 422,
            "detail": str(exc),
        }
    return {
        "type": "urn:cpp:problem:job-failed",
        "title": "The job failed",
        "status": 500,
        "detail": f"{type(exc).__name__}: {exc}",
    }


class _ActiveRun:
    """State shared between a running job and its monitor thread."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.control = RunControl()
        self.lock = threading.Lock()
        self.progress: dict[str, Any] | None = None
        self.written: dict[str, Any] | None = None
        self.user_cancelled = False
        self.lost = False
        self.done = threading.Event()

    def record(self, event: ProgressEvent) -> None:
        with self.lock:
            self.progress = asdict(event)

    def cancel(self, *, by_user: bool) -> None:
        if by_user:
            self.user_cancelled = True
        self.control.cancel()


class Worker:
    """Runs jobs for one device in a background thread."""

    def __init__(
        self,
        store: JobStore,
        jobs_dir: Path,
        device: str,
        *,
        pipeline: Pipeline,
        encoder_factory: EncoderFactory,
        allowed_roots: Sequence[Path] = (),
        poll_interval_s: float = 1.0,
        lease_s: float = 120.0,
        nice: int = 0,
        progress_interval_s: float = 0.5,
        on_finish: FinishCallback | None = None,
        assign: Assign | None = None,
    ) -> None:
        self.store = store
        self.jobs_dir = jobs_dir
        self.device = device
        self.pipeline = pipeline
        self.encoder_factory = encoder_factory
        self.allowed_roots = tuple(allowed_roots)
        self.poll_interval_s = poll_interval_s
        self.nice = nice
        self.lease_s = lease_s
        self.progress_interval_s = progress_interval_s
        self.on_finish = on_finish
        self.assign = assign
        self.id = f"{socket.gethostname()}:{os.getpid()}:{device}:{uuid.uuid4().hex[:8]}"
        self._encoders: dict[str, Encoder] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._active: _ActiveRun | None = None
        self._thread = threading.Thread(target=self._loop, name=f"cpp-worker-{device}", daemon=True)

    # -- control from the API ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current batch; a running job goes back to the queue and resumes later."""
        self._stop.set()
        self._wake.set()
        active = self._active
        if active is not None:
            active.cancel(by_user=False)
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def wake(self) -> None:
        """A job was queued: look now instead of at the next poll."""
        self._wake.set()

    def cancel(self, job_id: str) -> bool:
        """Cancel ``job_id`` now if this worker runs it."""
        active = self._active
        if active is not None and active.job_id == job_id:
            active.cancel(by_user=True)
            return True
        return False

    # -- the worker thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.nice:
            # Linux niceness is per thread; threads and processes started from here inherit it.
            thread_id = threading.get_native_id()
            os.setpriority(
                os.PRIO_PROCESS, thread_id, max(self.nice, os.getpriority(os.PRIO_PROCESS, thread_id))
            )
        while not self._stop.is_set():
            try:
                job = self.store.claim(self.id, self.device, self.lease_s)
            except Exception:
                log.exception("worker %s could not claim a job", self.id)
                job = None
            if job is None:
                self._wake.wait(self.poll_interval_s)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception:  # the store failed while recording the outcome; the lease recovers the job
                log.exception("worker %s lost job %s", self.id, job.id)

    def _encoder(self, spec: str) -> Encoder:
        if spec not in self._encoders:
            self._encoders[spec] = self.encoder_factory(spec, self.device)
        return self._encoders[spec]

    def _run(self, job: JobRecord) -> None:
        if job.cancel_requested:
            self.store.finish(job.id, self.id, JobStatus.cancelled)
            return
        active = _ActiveRun(job.id)
        active.control.on_progress = active.record
        monitor = threading.Thread(target=self._monitor, args=(active,), name="cpp-job-monitor", daemon=True)
        self._active = active
        monitor.start()
        work_dir = job_folder(self.jobs_dir, job)
        started = time.perf_counter()
        status, error = JobStatus.succeeded, None
        log.info("job %s: running on %s (attempt %d)", job.id, self.device, job.attempts)
        try:
            source = SourceSpec.model_validate(job.source)
            work_dir.mkdir(parents=True, exist_ok=True)
            # A job reads under the allowed roots and inside its own folder (its uploads), checked per file.
            roots = confine_roots([*self.allowed_roots, work_dir])
            run = self._run_assign if job.kind is JobKind.assign else self._run_cluster
            run(job, source, work_dir, active.control, roots)
        except Cancelled:
            status = JobStatus.cancelled
        except Exception as exc:
            log.warning("job %s failed: %s", job.id, exc, exc_info=not isinstance(exc, CppError))
            status, error = JobStatus.failed, job_failure(exc)
        finally:
            active.done.set()
            monitor.join()
            self._active = None
        if status is JobStatus.cancelled and not active.user_cancelled and not active.lost:
            self.store.release(job.id, self.id)  # shutting down: resume at the next start
            log.info("job %s: re-queued at shutdown", job.id)
            return
        if not self.store.finish(job.id, self.id, status, error, active.progress):
            if self.store.get(job.id, kind=None) is None:  # deleted while running
                shutil.rmtree(work_dir, ignore_errors=True)
            return
        log.info("job %s: %s", job.id, status.value)
        if self.on_finish is not None:
            self.on_finish(status, time.perf_counter() - started)

    def _run_cluster(
        self, job: JobRecord, source: SourceSpec, work_dir: Path, control: RunControl, roots: Roots
    ) -> None:
        """Cluster the job's images with the encoder its options name."""
        options = ClusterOptions.model_validate(job.options).model_copy(update={"device": self.device})
        encoder = self._encoder(options.model)
        self.pipeline.run_cluster(source, options, work_dir, control=control, encoder=encoder, roots=roots)

    def _run_assign(
        self, job: JobRecord, source: SourceSpec, work_dir: Path, control: RunControl, roots: Roots
    ) -> None:
        """Assign the job's images to the clustering of its parent job, with that clustering's encoder."""
        from cpp import clustering

        options = AssignOptions.model_validate(job.options).model_copy(update={"device": self.device})
        found = clustering.open(self.jobs_dir / str(job.parent))
        encoder = self._encoder(str(found.manifest.encoder.get("id") or found.manifest.model))
        assign = self.assign or library_assign()
        assign(found.path, source, work_dir, options=options, encoder=encoder, control=control, roots=roots)

    def _monitor(self, active: _ActiveRun) -> None:
        """Heartbeat (with new progress) every interval; pass on cancel requests made through the store."""
        while not active.done.wait(self.progress_interval_s):
            with active.lock:
                progress = active.progress if active.progress != active.written else None
            try:
                cancel = self.store.heartbeat(active.job_id, self.id, progress)
            except Exception:
                log.exception("job %s: heartbeat failed", active.job_id)
                continue
            if progress is not None:
                active.written = progress
            if cancel is None:  # deleted, or taken over after a lost lease
                active.lost = True
                active.cancel(by_user=False)
            elif cancel:
                active.cancel(by_user=True)
