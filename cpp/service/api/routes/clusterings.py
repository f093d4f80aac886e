"""``/v1/clusterings``: the clusterings of finished cluster jobs, and assignment jobs of new images to them.

A clustering's id is the id of the cluster job that made it; it is owned by that job's key (other keys get
404, as for jobs). :func:`clustering_for` is the dependency that opens one for a route.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from cpp import clustering
from cpp.clustering import Clustering, ClusteringError
from cpp.service.api.deps import Caller, CallerDep, Services, ServicesDep
from cpp.service.api.schemas import ClusteringInfo, ClusteringLinks, ClusteringPage, ClusterSummary
from cpp.service.problems import ApiProblem, problem_responses
from cpp.service.store import JobRecord, JobStatus

router = APIRouter(prefix="/clusterings", tags=["clusterings"])

ClusteringId = Annotated[
    str,
    Path(
        description="Clustering id: the id of the cluster job that made it",
        pattern=r"^[0-9a-f]{32}$",
        examples=["3f6c0b8f0a2d4c1e9b7a5d4c3b2a1f0e"],
    ),
]


def _not_found(clustering_id: str) -> ApiProblem:
    return ApiProblem(404, "not-found", "Clustering not found", f"no clustering with id {clustering_id}")


def open_clustering(services: Services, clustering_id: str, caller: Caller) -> Clustering:
    """The clustering of cluster job ``clustering_id`` if ``caller`` may see the job (404 otherwise, as if it
    did not exist); 409 while the job has not succeeded or when it left no clustering."""
    job = services.store.get(clustering_id, caller.sees)
    if job is None:
        raise _not_found(clustering_id)
    return _open(services, job)


def _open(services: Services, job: JobRecord) -> Clustering:
    if job.status is not JobStatus.succeeded:
        raise ApiProblem(
            409,
            "clustering-not-ready",
            "Clustering not ready",
            f"job {job.id} is {job.status.value}; its clustering exists once it has succeeded",
            job_status=job.status.value,
        )
    try:
        return clustering.open(services.settings.jobs_dir / job.id)
    except ClusteringError as exc:
        raise ApiProblem(409, "no-clustering", "Job has no clustering", f"job {job.id}: {exc}") from exc


def clustering_for(clustering_id: ClusteringId, services: ServicesDep, caller: CallerDep) -> Clustering:
    """FastAPI dependency: the clustering named by the path parameter ``clustering_id``, owner-checked."""
    return open_clustering(services, clustering_id, caller)


ClusteringDep = Annotated[Clustering, Depends(clustering_for)]


def clustering_info(job_id: str, found: Clustering) -> ClusteringInfo:
    """The API view of ``found``, the clustering of job ``job_id``: manifest and newest clusters."""
    manifest = found.manifest
    state = found.state()
    base = f"/v1/clusterings/{job_id}"
    return ClusteringInfo(
        id=job_id,
        created_at=manifest.created_at,
        model=manifest.model,
        encoder=manifest.encoder,
        space=manifest.space,
        members=manifest.members,
        revision=state.revision,
        novelty=manifest.novelty.model_dump(),
        clusters=[
            ClusterSummary(
                id=c.id, name=c.name, size=c.size, uncertain=c.uncertain, representatives=c.representatives
            )
            for c in state.clusters
        ],
        links=ClusteringLinks(self=base, job=f"/v1/jobs/{job_id}", assignments=f"{base}/assignments"),
    )


@router.get("", summary="List clusterings", responses=problem_responses(401, 422))
def list_clusterings(
    services: ServicesDep,
    caller: CallerDep,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> ClusteringPage:
    """The clusterings of the caller's succeeded cluster jobs (an admin key: everyone's), newest first."""
    jobs, total = services.store.list_jobs(
        status=JobStatus.succeeded, offset=offset, limit=limit, owner=caller.sees
    )
    items = []
    for job in jobs:
        try:
            items.append(clustering_info(job.id, clustering.open(services.settings.jobs_dir / job.id)))
        except ClusteringError:  # finished before clusterings were saved, or its files are gone
            continue
    return ClusteringPage(items=items, total=total, offset=offset, limit=limit)


@router.get("/{clustering_id}", summary="Get a clustering", responses=problem_responses(401, 404, 409, 422))
def get_clustering(clustering_id: ClusteringId, found: ClusteringDep) -> ClusteringInfo:
    """The clustering's encoder, novelty calibration, newest revision and its clusters."""
    return clustering_info(clustering_id, found)
