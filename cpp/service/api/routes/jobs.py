"""``/v1/jobs``: submit, inspect, page, cancel and delete clustering jobs."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Header, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from cpp.options import AssignOptions, ClusterOptions, SourceSpec
from cpp.result import ClusterResult
from cpp.service.api.deps import Caller, CallerDep, Services, ServicesDep, SettingsDep, StoreDep
from cpp.service.api.schemas import AssignmentJob, AssignmentPage, Job, JobPage, JobRequest
from cpp.service.forms import Upload, form_options, receive_upload, upload_body
from cpp.service.paths import check_request_paths, check_vocabulary_paths
from cpp.service.problems import ApiProblem, problem_responses
from cpp.service.store import IdempotencyConflict, JobKind, JobRecord, JobStatus, JobStore


class JobIdConvertor(Convertor[str]):
    """Routes match only well-formed job ids, so ``/v1/jobs/upload`` is never taken for a job."""

    regex = "[0-9a-f]{32}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("job_id", JobIdConvertor())
router = APIRouter(prefix="/jobs", tags=["jobs"])

JobId = Annotated[
    str, Path(description="Job id", pattern=r"^[0-9a-f]{32}$", examples=["3f6c0b8f0a2d4c1e9b7a5d4c3b2a1f0e"])
]
#: Query parameters of the listing routes.
StatusFilter = Annotated[JobStatus | None, Query(alias="status", description="Only jobs in this state")]
Offset = Annotated[int, Query(ge=0, le=10**9)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Repeat a request safely: the same key and body return the same job.",
    ),
]

_UPLOAD_BODY = upload_body("ClusterOptions", '{"clusters": "auto", "vocabulary": ["imagenet1k"]}')

_REPLAY_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"model": Job, "description": "The job created earlier with this Idempotency-Key."}
}


def _job_or_404(store: JobStore, job_id: str, caller: Caller) -> JobRecord:
    """The job, if the caller may see it (other keys' jobs are 404, as if they did not exist)."""
    job = store.get(job_id, caller.sees)
    if job is None:
        raise ApiProblem(404, "not-found", "Job not found", f"no job with id {job_id}")
    return job


def _effective_options(services: Services, options: ClusterOptions) -> ClusterOptions:
    """Replace the 'auto' model with the server's and check the model and device may be used."""
    settings = services.settings
    model = settings.model if options.model == "auto" else options.model
    allowed = [settings.model, *settings.allowed_models]
    if model not in allowed:
        raise ApiProblem(
            403,
            "model-not-allowed",
            "Model not allowed",
            f"options.model {model!r} is not served here; use 'auto' or one of {allowed}",
        )
    if options.device != "auto" and options.device not in settings.devices:
        raise ApiProblem(
            422,
            "device-not-available",
            "Device not available",
            f"options.device {options.device!r}: this server runs on {settings.devices}; use 'auto'",
        )
    return options.model_copy(update={"model": model})


def _request_hash(source: SourceSpec, options: ClusterOptions) -> str:
    body = {"source": source.model_dump(mode="json"), "options": options.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


ViewT = TypeVar("ViewT", Job, AssignmentJob)


def queue_job(
    services: Services,
    response: Response,
    view: Callable[[JobRecord], ViewT],
    *,
    job_id: str,
    source: SourceSpec,
    options: ClusterOptions | AssignOptions,
    request_hash: str,
    idempotency_key: str | None,
    caller: Caller,
    parent: str | None = None,
) -> tuple[ViewT, bool]:
    """Queue a job for ``caller`` (an assignment job: with its clustering as ``parent``) and answer with its
    ``view`` at ``Location``: 202 for a new job, 200 for the one made earlier with this Idempotency-Key."""
    try:
        record, created = services.store.create(
            job_id=job_id,
            source=source.model_dump(mode="json"),
            options=options.model_dump(mode="json"),
            device=options.device,
            request_hash=request_hash,
            idempotency_key=idempotency_key,
            owner=caller.key_id,
            kind=JobKind.cluster if parent is None else JobKind.assign,
            parent=parent,
        )
    except IdempotencyConflict:
        raise ApiProblem(
            422,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            "this Idempotency-Key was used with a different request; use a new key",
        ) from None
    job = view(record)
    response.headers["Location"] = job.links.self
    response.status_code = status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK
    if created:
        services.wake_workers()
    return job, created


async def queue_upload_job(
    services: Services,
    response: Response,
    view: Callable[[JobRecord], ViewT],
    upload: Upload[ClusterOptions] | Upload[AssignOptions],
    idempotency_key: str | None,
    caller: Caller,
    parent: str | None = None,
) -> ViewT:
    """:func:`queue_job` for a received upload; its files are removed when that fails or returns an
    existing job (a repeated Idempotency-Key)."""
    try:
        job, created = await run_in_threadpool(
            lambda: queue_job(
                services,
                response,
                view,
                job_id=upload.job_id,
                source=upload.source,
                options=upload.options,
                request_hash=upload.digest,
                idempotency_key=idempotency_key,
                caller=caller,
                parent=parent,
            )
        )
    except BaseException:
        shutil.rmtree(upload.job_dir, ignore_errors=True)
        raise
    if not created:
        shutil.rmtree(upload.job_dir, ignore_errors=True)
    return job


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Submit a job over server-side images",
    response_description="The queued job (200 with the existing job for a repeated Idempotency-Key).",
    responses=_REPLAY_RESPONSE | problem_responses(400, 401, 403, 411, 413, 422),
)
def create_job(
    body: JobRequest,
    services: ServicesDep,
    caller: CallerDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Job:
    """Queue a clustering job over a server-side source under `CPP_ALLOWED_ROOTS`."""
    options = _effective_options(services, body.options)
    check_request_paths(body.source, options, services.settings.allowed_roots)
    job, _ = queue_job(
        services,
        response,
        Job.from_record,
        job_id=uuid.uuid4().hex,
        source=body.source,
        options=options,
        request_hash=_request_hash(body.source, options),
        idempotency_key=idempotency_key,
        caller=caller,
    )
    return job


def _upload_options(services: Services, raw: str | None) -> ClusterOptions:
    """An upload's options, as they will run; its vocabulary files must lie under the allowed roots."""
    options = _effective_options(services, form_options(ClusterOptions, raw))
    check_vocabulary_paths(options, services.settings.allowed_roots)
    return options


@router.post(
    "/upload",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Submit a job over uploaded images",
    response_description="The queued job (200 with the existing job for a repeated Idempotency-Key).",
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses=_REPLAY_RESPONSE | problem_responses(400, 401, 403, 411, 413, 422, 507),
)
async def upload_job(
    request: Request,
    services: ServicesDep,
    caller: CallerDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Job:
    """Upload images and/or zip archives of images (multipart field `files`) and queue a job over them."""
    job_id = uuid.uuid4().hex
    job_dir = services.settings.jobs_dir / job_id
    upload = await receive_upload(
        request, services.settings, job_id, job_dir, read_options=lambda raw: _upload_options(services, raw)
    )
    return await queue_upload_job(services, response, Job.from_record, upload, idempotency_key, caller)


@router.get("", summary="List jobs", responses=problem_responses(401, 422))
def list_jobs(
    store: StoreDep,
    caller: CallerDep,
    status_filter: StatusFilter = None,
    offset: Offset = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobPage:
    """The caller's jobs (an admin key: every job), newest first."""
    jobs, total = store.list_jobs(status=status_filter, offset=offset, limit=limit, owner=caller.sees)
    return JobPage(items=[Job.from_record(j) for j in jobs], total=total, offset=offset, limit=limit)


@router.get("/{job_id:job_id}", summary="Get a job", responses=problem_responses(401, 404, 422))
def get_job(job_id: JobId, store: StoreDep, caller: CallerDep) -> Job:
    """Status, progress (stage, done, total, rate, ETA) and, for failed jobs, the error problem."""
    return Job.from_record(_job_or_404(store, job_id, caller))


def require_succeeded(job: JobRecord, what: str = "job", title: str = "Job has no result") -> None:
    """409 unless ``job`` (a ``what``) has succeeded: ``job-not-finished`` while it is queued or running."""
    if job.status is not JobStatus.succeeded:
        raise ApiProblem(
            409,
            "job-not-finished"
            if job.status in (JobStatus.queued, JobStatus.running)
            else "job-has-no-result",
            title,
            f"{what} {job.id} is {job.status.value}; results exist once it has succeeded",
            job_status=job.status.value,
        )


def json_file_response(path: pathlib.Path, gone: str) -> Response:
    """The JSON file at ``path`` of a succeeded job; 500 ``result-missing`` with detail ``gone`` if it is not
    there."""
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise ApiProblem(500, "result-missing", "Result missing", gone) from None
    return Response(content, media_type="application/json")


@router.get(
    "/{job_id:job_id}/result",
    summary="Get a job's result",
    response_model=ClusterResult,
    responses=problem_responses(401, 404, 409, 422),
)
def get_result(job_id: JobId, store: StoreDep, settings: SettingsDep, caller: CallerDep) -> Response:
    """The `ClusterResult` (as `cpp cluster` writes it); 409 until the job has succeeded."""
    job = _job_or_404(store, job_id, caller)
    require_succeeded(job)
    return json_file_response(
        settings.jobs_dir / job_id / "result.json", f"job {job_id} succeeded but its result file is gone"
    )


@router.get(
    "/{job_id:job_id}/assignments",
    summary="Page through a job's per-image assignments",
    responses=problem_responses(401, 404, 409, 422),
)
def get_assignments(
    job_id: JobId,
    services: ServicesDep,
    caller: CallerDep,
    offset: Offset = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AssignmentPage:
    """Assignments in result order; 409 until the job has succeeded."""
    job = _job_or_404(services.store, job_id, caller)
    require_succeeded(job)
    items, total = services.pipeline.read_assignments(
        services.settings.jobs_dir / job_id, offset=offset, limit=limit
    )
    return AssignmentPage(items=items, total=total, offset=offset, limit=limit)


def stop_cancelled(services: Services, job: JobRecord, what: str) -> None:
    """After a cancel request: 409 if ``job`` (a ``what``) had already finished; stop it now if one of this
    process's workers runs it (a queued job is cancelled by the request itself)."""
    if job.status in (JobStatus.succeeded, JobStatus.failed):
        raise ApiProblem(
            409,
            "job-finished",
            "Job already finished",
            f"{what} {job.id} is {job.status.value}",
            job_status=job.status.value,
        )
    if job.status is JobStatus.running:
        services.cancel_running(job.id)


@router.post(
    "/{job_id:job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Cancel a job",
    responses=problem_responses(401, 404, 409, 422),
)
def cancel_job(job_id: JobId, services: ServicesDep, caller: CallerDep) -> Job:
    """A queued job is cancelled at once; a running one stops after its current batch."""
    job = services.store.request_cancel(job_id, caller.sees)
    if job is None:
        raise ApiProblem(404, "not-found", "Job not found", f"no job with id {job_id}")
    stop_cancelled(services, job, "job")
    return Job.from_record(job)


@router.delete(
    "/{job_id:job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a job and its files",
    responses=problem_responses(401, 404, 422),
)
def delete_job(job_id: JobId, services: ServicesDep, caller: CallerDep) -> Response:
    """Running jobs are cancelled first (waiting up to CPP_DELETE_WAIT_S for the current batch)."""
    store = services.store
    job = _job_or_404(store, job_id, caller)
    if job.status is JobStatus.running:
        store.request_cancel(job_id)
        services.cancel_running(job_id)
        deadline = time.monotonic() + services.settings.delete_wait_s
        while (current := store.get(job_id)) is not None and current.status is JobStatus.running:
            if time.monotonic() > deadline:
                break  # its worker notices the row is gone at its next heartbeat and removes the files
            time.sleep(0.05)
    store.delete(job_id)
    shutil.rmtree(services.settings.jobs_dir / job_id, ignore_errors=True)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
