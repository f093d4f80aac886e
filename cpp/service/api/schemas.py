"""Request and response models of the HTTP API (the result itself is :class:`cpp.result.ClusterResult`)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cpp.options import ClusterOptions, SourceSpec
from cpp.result import Assignment
from cpp.service.problems import Problem
from cpp.service.store import JobRecord, JobStatus

JOB_REQUEST_EXAMPLE: dict[str, Any] = {
    "source": {"type": "folder", "path": "/data/photos", "labels_from_folders": False},
    "options": {"model": "auto", "clusters": "auto", "vocabulary": ["imagenet1k"]},
}


class JobRequest(BaseModel):
    """What to cluster and how: the same models as ``cpp cluster``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [JOB_REQUEST_EXAMPLE]})

    source: SourceSpec
    options: ClusterOptions = Field(default_factory=ClusterOptions)


class Progress(BaseModel):
    stage: str = Field(description="embed, fit, readout or name", examples=["embed"])
    done: int = Field(examples=[1280])
    total: int | None = Field(default=None, examples=[10000])
    rate: float | None = Field(default=None, description="items per second", examples=[412.5])
    eta_s: float | None = Field(default=None, description="seconds left in this stage", examples=[21.1])


class JobLinks(BaseModel):
    self: str
    result: str
    assignments: str
    cancel: str


def _time(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, tz=timezone.utc) if value is not None else None


class Job(BaseModel):
    """A clustering job and where it stands."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "3f6c0b8f0a2d4c1e9b7a5d4c3b2a1f0e",
                    "status": "running",
                    "created_at": "2026-01-01T12:00:00Z",
                    "updated_at": "2026-01-01T12:00:05Z",
                    "started_at": "2026-01-01T12:00:01Z",
                    "finished_at": None,
                    "source": JOB_REQUEST_EXAMPLE["source"],
                    "options": {**ClusterOptions().model_dump(), "model": "effnet-lite0-in1k"},
                    "progress": {
                        "stage": "embed",
                        "done": 1280,
                        "total": 10000,
                        "rate": 412.5,
                        "eta_s": 21.1,
                    },
                    "error": None,
                    "cancel_requested": False,
                    "attempts": 1,
                    "links": {
                        "self": "/v1/jobs/3f6c0b8f0a2d4c1e9b7a5d4c3b2a1f0e",
                        "result": "/v1/jobs/3f6c0b8f0a2d4c1e9b7a5d4c3b2a1f0e/result",
                        "assignments": "/v1/jobs/3f6c0b8f0a2d4c1e9b7a5d4c3b2a1f0e/assignments",
                        "cancel": "/v1/jobs/3f6c0b8f0a2d4c1e9b7a5d4c3b2a1f0e/cancel",
                    },
                }
            ]
        }
    )

    id: str
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    source: SourceSpec
    options: ClusterOptions = Field(description="The options as run ('auto' model replaced by the server's).")
    progress: Progress | None = Field(default=None, description="Latest progress of the current stage.")
    error: Problem | None = Field(default=None, description="Why the job failed (status 'failed').")
    cancel_requested: bool = False
    attempts: int = Field(description="How many times a worker started the job (more after restarts).")
    links: JobLinks

    @classmethod
    def from_record(cls, job: JobRecord) -> Job:
        base = f"/v1/jobs/{job.id}"
        return cls(
            id=job.id,
            status=job.status,
            created_at=datetime.fromtimestamp(job.created_at, tz=timezone.utc),
            updated_at=datetime.fromtimestamp(job.updated_at, tz=timezone.utc),
            started_at=_time(job.started_at),
            finished_at=_time(job.finished_at),
            source=SourceSpec.model_validate(job.source),
            options=ClusterOptions.model_validate(job.options),
            progress=Progress.model_validate(job.progress) if job.progress else None,
            error=Problem.model_validate(job.error) if job.error else None,
            cancel_requested=job.cancel_requested,
            attempts=job.attempts,
            links=JobLinks(
                self=base, result=f"{base}/result", assignments=f"{base}/assignments", cancel=f"{base}/cancel"
            ),
        )


class JobPage(BaseModel):
    items: list[Job]
    total: int = Field(description="Jobs matching the filter.")
    offset: int
    limit: int


class AssignmentPage(BaseModel):
    items: list[Assignment]
    total: int = Field(description="Assignments of the job.")
    offset: int
    limit: int


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    checks: dict[str, str] = Field(default_factory=dict, examples=[{"database": "ok", "workers": "1 alive"}])
