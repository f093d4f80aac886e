"""``/v1/clusterings``: the clusterings of finished cluster jobs, and assignment jobs of new images to them.

A clustering's id is the id of the cluster job that made it; it is owned by that job's key (other keys get
404, as for jobs). :func:`clustering_for` is the dependency that opens one for a route.

Assignment jobs (``/v1/clusterings/{id}/assignments``) take a server-side source or an upload with the same
confinement, limits, authentication and ``Idempotency-Key`` handling as cluster jobs; their files lie in the
clustering's folder (``jobs/<id>/assign/<assignment id>``) and go with it when its job is deleted. Their
results are JSON lines (one :class:`cpp.assign.NewImage` per image), paged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool

from cpp import clustering
from cpp.clustering import Clustering, ClusteringError
from cpp.options import AssignOptions, ClusterOptions, SourceSpec
from cpp.service.api.deps import Caller, CallerDep, Services, ServicesDep
from cpp.service.api.routes.jobs import (  # also registers the ``job_id`` path convertor
    IdempotencyKey,
    Offset,
    StatusFilter,
    json_file_response,
    queue_job,
    queue_upload_job,
    require_succeeded,
    stop_cancelled,
)
from cpp.service.api.schemas import (
    AssignmentJob,
    AssignmentJobPage,
    AssignRequest,
    ClusteringInfo,
    ClusteringLinks,
    ClusteringPage,
    ClusterSummary,
)
from cpp.service.forms import form_options, receive_upload, upload_body
from cpp.service.paths import check_request_paths
from cpp.service.problems import ApiProblem, problem_responses
from cpp.service.store import JobKind, JobRecord, JobStatus
from cpp.service.worker import assignment_folder, job_folder

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
        members=manifest.fitted_members,
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
    offset: Offset = 0,
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


# -- assignment jobs ---------------------------------------------------------------------------------------

AssignmentId = Annotated[
    str,
    Path(
        description="Assignment job id",
        pattern=r"^[0-9a-f]{32}$",
        examples=["5d1e0c9b8a7f4e3d2c1b0a9f8e7d6c5b"],
    ),
]
#: Media type of the results: one JSON object per line.
JSON_LINES = "application/jsonl"

_UPLOAD_BODY = upload_body("AssignOptions", '{"novelty_quantile": 0.05}')
_RESULTS_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {JSON_LINES: {}}, "description": "One NewImage JSON object per line."}
}
_QUEUED = "The queued assignment job (200 with the existing one for a repeated Idempotency-Key)."
_REPLAY_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"model": AssignmentJob, "description": "The job created earlier with this Idempotency-Key."}
}


def _assignment_or_404(
    services: Services, clustering_id: str, assignment_id: str, caller: Caller
) -> JobRecord:
    """The assignment job, if it belongs to this clustering and the caller may see it."""
    job = services.store.get(assignment_id, caller.sees, kind=JobKind.assign)
    if job is None or job.parent != clustering_id:
        raise ApiProblem(
            404,
            "not-found",
            "Assignment not found",
            f"clustering {clustering_id} has no assignment {assignment_id}",
        )
    return job


def _check_device(services: Services, options: AssignOptions) -> None:
    if options.device != "auto" and options.device not in services.settings.devices:
        raise ApiProblem(
            422,
            "device-not-available",
            "Device not available",
            f"options.device {options.device!r}: this server runs on {services.settings.devices}; use 'auto'",
        )


def _request_hash(clustering_id: str, source: SourceSpec, options: AssignOptions) -> str:
    body = {
        "kind": JobKind.assign.value,
        "clustering": clustering_id,
        "source": source.model_dump(mode="json"),
        "options": options.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@router.post(
    "/{clustering_id:job_id}/assignments",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Assign server-side images to a clustering",
    response_description=_QUEUED,
    responses=_REPLAY_RESPONSE | problem_responses(400, 401, 403, 404, 409, 411, 413, 422),
)
def create_assignment(
    clustering_id: ClusteringId,
    body: AssignRequest,
    found: ClusteringDep,
    services: ServicesDep,
    caller: CallerDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> AssignmentJob:
    """Queue an assignment job over a server-side source under `CPP_ALLOWED_ROOTS`: each image gets the
    clustering's nearest cluster of its newest revision, its name, a confidence and a novel flag."""
    _check_device(services, body.options)
    check_request_paths(body.source, ClusterOptions(), services.settings.allowed_roots)  # no vocabulary files
    job, _ = queue_job(
        services,
        response,
        AssignmentJob.from_record,
        job_id=uuid.uuid4().hex,
        parent=clustering_id,
        source=body.source,
        options=body.options,
        request_hash=_request_hash(clustering_id, body.source, body.options),
        idempotency_key=idempotency_key,
        caller=caller,
    )
    return job


def _upload_options(services: Services, raw: str | None) -> AssignOptions:
    options = form_options(AssignOptions, raw)
    _check_device(services, options)
    return options


@router.post(
    "/{clustering_id:job_id}/assignments/upload",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Assign uploaded images to a clustering",
    response_description=_QUEUED,
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses=_REPLAY_RESPONSE | problem_responses(400, 401, 403, 404, 409, 411, 413, 422, 507),
)
async def upload_assignment(
    clustering_id: ClusteringId,
    request: Request,
    services: ServicesDep,
    caller: CallerDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> AssignmentJob:
    """Upload images and/or zip archives of images (multipart field `files`) and queue an assignment job."""
    await run_in_threadpool(open_clustering, services, clustering_id, caller)  # 404/409 before the body
    job_id = uuid.uuid4().hex
    job_dir = assignment_folder(services.settings.jobs_dir, clustering_id, job_id)

    def clustering_still_there() -> None:  # it may have been deleted while the files came in
        if not (services.settings.jobs_dir / clustering_id).is_dir():
            raise _not_found(clustering_id)
        job_dir.parent.mkdir(parents=True, exist_ok=True)

    upload = await receive_upload(
        request,
        services.settings,
        job_id,
        job_dir,
        read_options=lambda raw: _upload_options(services, raw),
        identity={"clustering": clustering_id},
        before_publish=clustering_still_there,
    )
    return await queue_upload_job(
        services, response, AssignmentJob.from_record, upload, idempotency_key, caller, parent=clustering_id
    )


@router.get(
    "/{clustering_id:job_id}/assignments",
    summary="List a clustering's assignment jobs",
    responses=problem_responses(401, 404, 409, 422),
)
def list_assignments(
    clustering_id: ClusteringId,
    found: ClusteringDep,
    services: ServicesDep,
    caller: CallerDep,
    status_filter: StatusFilter = None,
    offset: Offset = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> AssignmentJobPage:
    """The caller's assignment jobs of this clustering, newest first."""
    jobs, total = services.store.list_jobs(
        status=status_filter,
        offset=offset,
        limit=limit,
        owner=caller.sees,
        kind=JobKind.assign,
        parent=clustering_id,
    )
    return AssignmentJobPage(
        items=[AssignmentJob.from_record(j) for j in jobs], total=total, offset=offset, limit=limit
    )


@router.get(
    "/{clustering_id:job_id}/assignments/{assignment_id:job_id}",
    summary="Get an assignment job",
    responses=problem_responses(401, 404, 422),
)
def get_assignment(
    clustering_id: ClusteringId, assignment_id: AssignmentId, services: ServicesDep, caller: CallerDep
) -> AssignmentJob:
    """Status, progress (stages embed, then assign) and, for failed jobs, the error problem."""
    return AssignmentJob.from_record(_assignment_or_404(services, clustering_id, assignment_id, caller))


def _finished_folder(services: Services, job: JobRecord) -> FilePath:
    require_succeeded(job, "assignment", "Assignment has no results")
    return job_folder(services.settings.jobs_dir, job)


@router.get(
    "/{clustering_id:job_id}/assignments/{assignment_id:job_id}/results",
    summary="Page through an assignment's per-image results (JSON lines)",
    response_class=Response,
    responses=_RESULTS_RESPONSE | problem_responses(401, 404, 409, 422),
)
def get_results(
    clustering_id: ClusteringId,
    assignment_id: AssignmentId,
    services: ServicesDep,
    caller: CallerDep,
    offset: Offset = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    """Results in source order, one JSON object per line (`key`, `path`, `cluster`, `name`, `confidence`,
    `novel`, `score`, `member`, `true_label`); `X-Total-Count` gives the total and `Link` the next page."""
    from cpp.assign import read_results

    job = _assignment_or_404(services, clustering_id, assignment_id, caller)
    lines, total = read_results(_finished_folder(services, job), offset=offset, limit=limit)
    headers = {"X-Total-Count": str(total)}
    if offset + len(lines) < total:
        base = f"/v1/clusterings/{clustering_id}/assignments/{assignment_id}/results"
        headers["Link"] = f'<{base}?offset={offset + len(lines)}&limit={limit}>; rel="next"'
    return Response(b"".join(lines), media_type=JSON_LINES, headers=headers)


@router.get(
    "/{clustering_id:job_id}/assignments/{assignment_id:job_id}/summary",
    summary="Get an assignment's summary",
    responses=problem_responses(401, 404, 409, 422),
)
def get_summary(
    clustering_id: ClusteringId, assignment_id: AssignmentId, services: ServicesDep, caller: CallerDep
) -> Response:
    """Images per cluster, novel count and share, and per cluster the new images' mean confidence beside
    the members' (a drift report), as `cpp assign --summary` writes it."""
    job = _assignment_or_404(services, clustering_id, assignment_id, caller)
    return json_file_response(
        _finished_folder(services, job) / "summary.json",
        f"assignment {assignment_id} succeeded but its summary is gone",
    )


@router.post(
    "/{clustering_id:job_id}/assignments/{assignment_id:job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Cancel an assignment job",
    responses=problem_responses(401, 404, 409, 422),
)
def cancel_assignment(
    clustering_id: ClusteringId, assignment_id: AssignmentId, services: ServicesDep, caller: CallerDep
) -> AssignmentJob:
    """A queued job is cancelled at once; a running one stops after its current batch."""
    _assignment_or_404(services, clustering_id, assignment_id, caller)
    job = services.store.request_cancel(assignment_id, caller.sees, kind=JobKind.assign)
    assert job is not None
    stop_cancelled(services, job, "assignment")
    return AssignmentJob.from_record(job)


@router.delete(
    "/{clustering_id:job_id}/assignments/{assignment_id:job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an assignment job and its files",
    responses=problem_responses(401, 404, 422),
)
def delete_assignment(
    clustering_id: ClusteringId, assignment_id: AssignmentId, services: ServicesDep, caller: CallerDep
) -> Response:
    """A running job is cancelled first; its worker removes what is left when it notices."""
    job = _assignment_or_404(services, clustering_id, assignment_id, caller)
    if job.status is JobStatus.running:
        services.store.request_cancel(assignment_id, kind=JobKind.assign)
        services.cancel_running(assignment_id)
    services.store.delete(assignment_id, kind=JobKind.assign)
    shutil.rmtree(job_folder(services.settings.jobs_dir, job), ignore_errors=True)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
