"""``/v1/jobs``: submit, inspect, page, cancel and delete clustering jobs."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from starlette.convertors import Convertor, register_url_convertor

from cpp.options import ClusterOptions, SourceSpec
from cpp.result import ClusterResult
from cpp.service.api.deps import Caller, CallerDep, Services, ServicesDep, SettingsDep, StoreDep
from cpp.service.api.schemas import AssignmentPage, Job, JobPage, JobRequest
from cpp.service.paths import check_request_paths, check_vocabulary_paths
from cpp.service.problems import ApiProblem, problem_responses
from cpp.service.store import IdempotencyConflict, JobRecord, JobStatus, JobStore
from cpp.service.upload_form import read_upload_form
from cpp.service.uploads import STAGING_DIR, StagedUpload, UploadLimits, UploadWriter


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
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Repeat a request safely: the same key and body return the same job.",
    ),
]

_UPLOAD_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["files"],
                "additionalProperties": False,
                "properties": {
                    "files": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "Images and/or .zip archives of images (folders in a zip are kept).",
                    },
                    "options": {
                        "type": "string",
                        "description": "ClusterOptions as a JSON object (default: all defaults).",
                        "example": '{"clusters": "auto", "vocabulary": ["imagenet1k"]}',
                    },
                    "labels_from_folders": {
                        "type": "boolean",
                        "default": False,
                        "description": "Use each image's folder in the zip as its true label.",
                    },
                },
            }
        }
    },
}


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


def _submit(
    services: Services,
    response: Response,
    *,
    job_id: str,
    source: SourceSpec,
    options: ClusterOptions,
    request_hash: str,
    idempotency_key: str | None,
    caller: Caller,
) -> tuple[Job, bool]:
    try:
        record, created = services.store.create(
            job_id=job_id,
            source=source.model_dump(mode="json"),
            options=options.model_dump(mode="json"),
            device=options.device,
            request_hash=request_hash,
            idempotency_key=idempotency_key,
            owner=caller.key_id,
        )
    except IdempotencyConflict:
        raise ApiProblem(
            422,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            "this Idempotency-Key was used with a different request; use a new key",
        ) from None
    response.headers["Location"] = f"/v1/jobs/{record.id}"
    response.status_code = status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK
    if created:
        services.wake_workers()
    return Job.from_record(record), created


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
    job, _ = _submit(
        services,
        response,
        job_id=uuid.uuid4().hex,
        source=body.source,
        options=options,
        request_hash=_request_hash(body.source, options),
        idempotency_key=idempotency_key,
        caller=caller,
    )
    return job


def _form_bool(value: Any, field: str) -> bool:
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise ApiProblem(
        422, "validation", "Request is not valid", f"{field}: expected true or false, got {text!r}"
    )


def _upload_options(raw: str | None) -> ClusterOptions:
    try:
        return ClusterOptions.model_validate_json(raw or "{}")
    except ValidationError as exc:
        raise ApiProblem(
            422,
            "validation",
            "Request is not valid",
            "form field 'options' is not valid ClusterOptions JSON",
            errors=[
                {"loc": ["options", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()
            ],
        ) from exc


async def _receive_upload(
    request: Request, services: Services, job_id: str, job_dir: pathlib.Path
) -> tuple[ClusterOptions, bool, str]:
    """Stream an upload's files into ``job_dir`` and read its fields: the job's options, whether labels come
    from folders, and the digest of the upload (files, options and labels) that identifies the request."""
    settings = services.settings
    limits = UploadLimits(
        settings.max_upload_bytes,
        settings.max_upload_files,
        settings.max_image_pixels,
        settings.max_zip_ratio,
    )
    # Written into a locked staging folder, moved into place only when complete: a process killed
    # midway leaves a folder that the next start-up removes (cpp.service.uploads.remove_orphans).
    staged = await run_in_threadpool(StagedUpload, settings.data_dir / STAGING_DIR, job_id)
    writer = UploadWriter(staged.folder, limits)
    try:
        try:
            fields = await read_upload_form(
                request, writer, max_field_bytes=settings.max_json_bytes, max_files=settings.max_upload_files
            )
        finally:
            writer.close()
        options = _effective_options(services, _upload_options(fields.get("options")))
        check_vocabulary_paths(options, settings.allowed_roots)
        labels = _form_bool(fields.get("labels_from_folders"), "labels_from_folders")
        if writer.parts == 0:
            raise ApiProblem(
                422, "bad-upload", "No files", "send images or zip archives in the form field 'files'"
            )
        salt = json.dumps(
            {"options": options.model_dump(mode="json"), "labels": labels}, sort_keys=True
        ).encode()
        _, digest = writer.finish(salt)
        await run_in_threadpool(staged.publish, job_dir)
    except BaseException:
        staged.discard()
        raise
    return options, labels, digest


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
    options, labels, digest = await _receive_upload(request, services, job_id, job_dir)
    source = SourceSpec(type="folder", path=str((job_dir / "upload").resolve()), labels_from_folders=labels)
    try:
        job, created = await run_in_threadpool(
            lambda: _submit(
                services,
                response,
                job_id=job_id,
                source=source,
                options=options,
                request_hash=digest,
                idempotency_key=idempotency_key,
                caller=caller,
            )
        )
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    if not created:
        shutil.rmtree(job_dir, ignore_errors=True)
    return job


@router.get("", summary="List jobs", responses=problem_responses(401, 422))
def list_jobs(
    store: StoreDep,
    caller: CallerDep,
    status_filter: Annotated[
        JobStatus | None, Query(alias="status", description="Only jobs in this state")
    ] = None,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobPage:
    """The caller's jobs (an admin key: every job), newest first."""
    jobs, total = store.list_jobs(status=status_filter, offset=offset, limit=limit, owner=caller.sees)
    return JobPage(items=[Job.from_record(j) for j in jobs], total=total, offset=offset, limit=limit)


@router.get("/{job_id:job_id}", summary="Get a job", responses=problem_responses(401, 404, 422))
def get_job(job_id: JobId, store: StoreDep, caller: CallerDep) -> Job:
    """Status, progress (stage, done, total, rate, ETA) and, for failed jobs, the error problem."""
    return Job.from_record(_job_or_404(store, job_id, caller))


def _require_succeeded(job: JobRecord) -> None:
    if job.status is not JobStatus.succeeded:
        raise ApiProblem(
            409,
            "job-not-finished"
            if job.status in (JobStatus.queued, JobStatus.running)
            else "job-has-no-result",
            "Job has no result",
            f"job {job.id} is {job.status.value}; results exist once it has succeeded",
            job_status=job.status.value,
        )


@router.get(
    "/{job_id:job_id}/result",
    summary="Get a job's result",
    response_model=ClusterResult,
    responses=problem_responses(401, 404, 409, 422),
)
def get_result(job_id: JobId, store: StoreDep, settings: SettingsDep, caller: CallerDep) -> Response:
    """The `ClusterResult` (as `cpp cluster` writes it); 409 until the job has succeeded."""
    job = _job_or_404(store, job_id, caller)
    _require_succeeded(job)
    path = settings.jobs_dir / job_id / "result.json"
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise ApiProblem(
            500, "result-missing", "Result missing", f"job {job_id} succeeded but its result file is gone"
        ) from None
    return Response(content, media_type="application/json")


@router.get(
    "/{job_id:job_id}/assignments",
    summary="Page through a job's per-image assignments",
    responses=problem_responses(401, 404, 409, 422),
)
def get_assignments(
    job_id: JobId,
    services: ServicesDep,
    caller: CallerDep,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AssignmentPage:
    """Assignments in result order; 409 until the job has succeeded."""
    job = _job_or_404(services.store, job_id, caller)
    _require_succeeded(job)
    items, total = services.pipeline.read_assignments(
        services.settings.jobs_dir / job_id, offset=offset, limit=limit
    )
    return AssignmentPage(items=items, total=total, offset=offset, limit=limit)


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
    if job.status in (JobStatus.succeeded, JobStatus.failed):
        raise ApiProblem(
            409,
            "job-finished",
            "Job already finished",
            f"job {job_id} is {job.status.value}",
            job_status=job.status.value,
        )
    if job.status is JobStatus.running:
        services.cancel_running(job_id)
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
