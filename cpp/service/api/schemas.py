"""Request and response models of the HTTP API (the result itself is :class:`cpp.result.ClusterResult`)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from cpp.options import AssignOptions, ClusterOptions, SourceSpec
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


def _record_fields(job: JobRecord) -> dict[str, Any]:
    """The fields every kind of job shows as they are stored (not its options, links or parent)."""
    return {
        "id": job.id,
        "status": job.status,
        "created_at": _time(job.created_at),
        "updated_at": _time(job.updated_at),
        "started_at": _time(job.started_at),
        "finished_at": _time(job.finished_at),
        "source": SourceSpec.model_validate(job.source),
        "progress": Progress.model_validate(job.progress) if job.progress else None,
        "error": Problem.model_validate(job.error) if job.error else None,
        "cancel_requested": job.cancel_requested,
        "attempts": job.attempts,
    }


ItemT = TypeVar("ItemT", bound=BaseModel)


class Page(BaseModel, Generic[ItemT]):
    """One page of a list: ``items`` from ``offset``, at most ``limit`` of ``total``."""

    items: list[ItemT]
    total: int
    offset: int
    limit: int


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
            **_record_fields(job),
            options=ClusterOptions.model_validate(job.options),
            links=JobLinks(
                self=base, result=f"{base}/result", assignments=f"{base}/assignments", cancel=f"{base}/cancel"
            ),
        )


class JobPage(Page[Job]):
    total: int = Field(description="Jobs matching the filter.")


class AssignmentPage(Page[Assignment]):
    total: int = Field(description="Assignments of the job.")


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    checks: dict[str, str] = Field(default_factory=dict, examples=[{"database": "ok", "workers": "1 alive"}])


class ClusterSummary(BaseModel):
    """One cluster of a clustering's newest revision."""

    id: int
    name: str
    size: int
    uncertain: bool
    representatives: list[str] = Field(default_factory=list)


class ClusteringLinks(BaseModel):
    self: str
    job: str
    assignments: str


class ClusteringInfo(BaseModel):
    """A clustering made by a finished cluster job (its id is the job's id)."""

    id: str = Field(description="The id of the cluster job that made it.")
    created_at: str
    model: str = Field(description="Encoder spec; new images are embedded with it.")
    encoder: dict[str, Any] = Field(description="The encoder's description, preprocessing included.")
    space: str = Field(description="'head' (the fitted head's Z) or 'raw' (encoder features).")
    members: int = Field(description="Images the clustering was fitted on.")
    revision: int = Field(description="The newest revision (0 = as fitted).")
    novelty: dict[str, Any] = Field(description="The label-free novelty calibration.")
    clusters: list[ClusterSummary]
    links: ClusteringLinks


class ClusteringPage(Page[ClusteringInfo]):
    total: int = Field(description="Succeeded cluster jobs (those without a clustering are left out).")


class AssignRequest(BaseModel):
    """New images to assign to a clustering: a server-side source and the assignment options."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"source": JOB_REQUEST_EXAMPLE["source"], "options": {}}]},
    )

    source: SourceSpec
    options: AssignOptions = Field(default_factory=AssignOptions)


class AssignmentJobLinks(BaseModel):
    self: str
    clustering: str
    results: str
    summary: str
    cancel: str


class AssignmentJob(BaseModel):
    """An assignment job (new images into a clustering) and where it stands."""

    id: str
    clustering: str = Field(description="The clustering (cluster job id) the images are assigned to.")
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    source: SourceSpec
    options: AssignOptions
    progress: Progress | None = Field(default=None, description="Latest progress: stage embed or assign.")
    error: Problem | None = Field(default=None, description="Why the job failed (status 'failed').")
    cancel_requested: bool = False
    attempts: int
    links: AssignmentJobLinks

    @classmethod
    def from_record(cls, job: JobRecord) -> AssignmentJob:
        assert job.parent is not None
        base = f"/v1/clusterings/{job.parent}/assignments/{job.id}"
        return cls(
            **_record_fields(job),
            clustering=job.parent,
            options=AssignOptions.model_validate(job.options),
            links=AssignmentJobLinks(
                self=base,
                clustering=f"/v1/clusterings/{job.parent}",
                results=f"{base}/results",
                summary=f"{base}/summary",
                cancel=f"{base}/cancel",
            ),
        )


class AssignmentJobPage(Page[AssignmentJob]):
    pass
