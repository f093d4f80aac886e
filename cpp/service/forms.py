"""Upload requests (``multipart/form-data``), the same for cluster jobs and assignment jobs.

:func:`receive_upload` streams the files into a locked staging folder (under the upload caps), reads the
text fields ``options`` (:func:`form_options`) and ``labels_from_folders`` (:func:`form_bool`) and moves the
folder into the job's place once it is complete; :func:`queue_upload` then queues the job and removes the
files again when no new job was made. What differs between the two kinds of job (which options model and
checks, what identifies the request, what must exist before the files are moved) the routes pass in.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from fastapi.concurrency import run_in_threadpool
from fastapi.requests import Request
from pydantic import BaseModel, ValidationError

from cpp.options import SourceSpec
from cpp.service.problems import ApiProblem
from cpp.service.settings import Settings
from cpp.service.upload_form import read_upload_form
from cpp.service.uploads import STAGING_DIR, StagedUpload, UploadLimits, UploadWriter

OptionsT = TypeVar("OptionsT", bound=BaseModel)


def form_bool(value: Any, field: str) -> bool:
    """A boolean form field (absent or empty: false); 422 for anything but true/false, 1/0, yes/no, on/off."""
    text = "" if value is None else str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise ApiProblem(
        422, "validation", "Request is not valid", f"{field}: expected true or false, got {text!r}"
    )


def form_options(model: type[OptionsT], raw: str | None) -> OptionsT:
    """The form field ``options``, a JSON object of ``model`` (absent: all defaults); 422 naming each bad
    field as ``options.<field>`` when it is not valid."""
    try:
        return model.model_validate_json(raw or "{}")
    except ValidationError as exc:
        raise ApiProblem(
            422,
            "validation",
            "Request is not valid",
            f"form field 'options' is not valid {model.__name__} JSON",
            errors=[
                {"loc": ["options", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()
            ],
        ) from exc


_FILES_HELP = "Images and/or .zip archives of images (folders in a zip are kept)."


def upload_body(options_model: str, example: str) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of an upload route whose ``options`` field holds ``options_model``."""
    return {
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
                            "description": _FILES_HELP,
                        },
                        "options": {
                            "type": "string",
                            "description": f"{options_model} as a JSON object (default: all defaults).",
                            "example": example,
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


@dataclass(frozen=True)
class Upload(Generic[OptionsT]):
    """A complete upload, moved into the folder of its job: the job's options, the digest of the files,
    options and labels (what identifies the request for ``Idempotency-Key``) and the job's source."""

    job_id: str
    job_dir: Path
    options: OptionsT
    digest: str
    source: SourceSpec


async def receive_upload(
    request: Request,
    settings: Settings,
    job_id: str,
    job_dir: Path,
    *,
    read_options: Callable[[str | None], OptionsT],
    identity: dict[str, Any] | None = None,
    before_publish: Callable[[], None] | None = None,
) -> Upload[OptionsT]:
    """Stream the upload of job ``job_id`` into ``job_dir``.

    ``read_options`` turns the ``options`` field into the job's options (raising :class:`ApiProblem` when
    they may not be used); ``identity`` adds fields to what the digest covers; ``before_publish`` runs (in a
    worker thread) once the upload is complete, just before the folder is moved to ``job_dir``.
    """
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
        options = read_options(fields.get("options"))
        labels = form_bool(fields.get("labels_from_folders"), "labels_from_folders")
        if writer.parts == 0:
            raise ApiProblem(
                422, "bad-upload", "No files", "send images or zip archives in the form field 'files'"
            )
        salt = {**(identity or {}), "options": options.model_dump(mode="json"), "labels": labels}
        _, digest = writer.finish(json.dumps(salt, sort_keys=True).encode())
        if before_publish is not None:
            await run_in_threadpool(before_publish)
        await run_in_threadpool(staged.publish, job_dir)
    except BaseException:
        staged.discard()
        raise
    source = SourceSpec(type="folder", path=str((job_dir / "upload").resolve()), labels_from_folders=labels)
    return Upload(job_id, job_dir, options, digest, source)
