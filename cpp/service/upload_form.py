"""Reading an upload's ``multipart/form-data`` body as it streams in (python-multipart's push parser).

File parts of the field ``files`` go straight to an :class:`~cpp.service.uploads.UploadWriter`, so no more
than about a megabyte of the body is held in memory at a time; the text fields ``options`` and
``labels_from_folders`` are kept. The body must match its ``Content-Length`` and end with the closing
boundary: an upload cut off midway is refused (400 ``bad-multipart``), never accepted with the parts
that happened to arrive (python-multipart's ``finalize()`` does not check this, and Starlette's form
parser returns whatever parts were complete).
"""

from __future__ import annotations

from fastapi.concurrency import run_in_threadpool
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect, Request

from cpp.service.problems import ApiProblem
from cpp.service.uploads import UploadWriter

FILES = "files"
TEXT_FIELDS = ("options", "labels_from_folders")
_FEED_BYTES = 1024 * 1024  # body bytes handed to the parser (in a worker thread) at a time


def _bad_multipart(detail: str) -> ApiProblem:
    return ApiProblem(400, "bad-multipart", "Malformed multipart body", detail)


def _decode(raw: bytes | bytearray) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class _Parts:
    """python-multipart callbacks: file parts to the writer, text fields into ``fields``."""

    def __init__(self, writer: UploadWriter, max_field_bytes: int, max_files: int) -> None:
        self.writer = writer
        self.max_field_bytes = max_field_bytes
        self.max_files = max_files
        self.fields: dict[str, str] = {}
        self.files = 0
        self._header = bytearray()
        self._value = bytearray()
        self._disposition: bytes | None = None
        self._field: str | None = None  # the text field being read; None while a file part is
        self._text = bytearray()

    def on_part_begin(self) -> None:
        self._disposition = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._header.clear()
        self._value.clear()

    def on_headers_finished(self) -> None:
        if self._disposition is None:
            raise _bad_multipart("a part has no Content-Disposition header")
        _, params = parse_options_header(self._disposition.decode("latin-1"))
        if b"name" not in params:
            raise _bad_multipart("a part's Content-Disposition has no name")
        name = _decode(params[b"name"])
        if name == FILES:
            if b"filename" not in params:
                raise ApiProblem(
                    422, "bad-upload", "File without a name", "every part of 'files' needs a filename"
                )
            self.files += 1
            if self.files > self.max_files:
                raise ApiProblem(
                    413,
                    "upload-too-large",
                    "Upload too large",
                    f"more than {self.max_files} files (CPP_MAX_UPLOAD_FILES)",
                )
            self._field = None
            self.writer.begin(_decode(params[b"filename"]))
        elif name in TEXT_FIELDS:
            if name in self.fields:
                raise ApiProblem(
                    422, "validation", "Request is not valid", f"form field {name!r} is sent twice"
                )
            self._field = name
            self._text.clear()
        else:
            raise ApiProblem(
                422,
                "validation",
                "Request is not valid",
                f"unknown form field {name[:100]!r}; send {FILES!r}, {TEXT_FIELDS[0]!r} "
                f"and {TEXT_FIELDS[1]!r}",
            )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._field is None:
            self.writer.write(data[start:end])
            return
        self._text += data[start:end]
        if len(self._text) > self.max_field_bytes:
            raise ApiProblem(
                413,
                "upload-too-large",
                "Upload too large",
                f"form field {self._field!r} is over {self.max_field_bytes} bytes (CPP_MAX_JSON_BYTES)",
            )

    def on_part_end(self) -> None:
        if self._field is None:
            self.writer.end()
        else:
            self.fields[self._field] = _decode(self._text)


def _feed(parser: MultipartParser, data: bytes) -> None:
    try:
        parser.write(data)
    except FormParserError as exc:
        raise _bad_multipart(str(exc)) from exc


def _parser(boundary: bytes, parts: _Parts) -> MultipartParser:
    """A multipart parser that hands every event to ``parts``."""
    try:
        return MultipartParser(
            boundary,
            {
                "on_part_begin": parts.on_part_begin,
                "on_header_field": parts.on_header_field,
                "on_header_value": parts.on_header_value,
                "on_header_end": parts.on_header_end,
                "on_headers_finished": parts.on_headers_finished,
                "on_part_data": parts.on_part_data,
                "on_part_end": parts.on_part_end,
            },
        )
    except FormParserError as exc:  # a boundary longer than RFC 2046 allows
        raise _bad_multipart(str(exc)) from exc


async def _feed_body(request: Request, parser: MultipartParser, declared: int | None) -> None:
    """Feed the request body to ``parser`` in pieces of about :data:`_FEED_BYTES`, checking it against its
    ``Content-Length`` (``declared``)."""
    received = 0
    pending: list[bytes] = []
    pending_bytes = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if declared is not None and received > declared:
                raise _bad_multipart(f"the body is longer than its Content-Length of {declared} bytes")
            pending.append(chunk)
            pending_bytes += len(chunk)
            if pending_bytes >= _FEED_BYTES:
                await run_in_threadpool(_feed, parser, b"".join(pending))
                pending.clear()
                pending_bytes = 0
    except ClientDisconnect:
        raise _bad_multipart(
            f"the client disconnected after {received} of {declared} bytes of the body"
        ) from None
    if declared is not None and received < declared:
        raise _bad_multipart(f"the body ends after {received} bytes; its Content-Length announced {declared}")
    if pending:
        await run_in_threadpool(_feed, parser, b"".join(pending))


async def read_upload_form(
    request: Request, writer: UploadWriter, *, max_field_bytes: int, max_files: int
) -> dict[str, str]:
    """Stream the body's files into ``writer``; return the text fields.

    Problems: 422 for a body that is not ``multipart/form-data`` or has unknown or repeated fields,
    413 past the limits, 400 ``bad-multipart`` for a malformed body, one that differs from its
    ``Content-Length`` or lacks the closing boundary, and when the client disconnects midway.
    """
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise ApiProblem(
            422,
            "bad-upload",
            "Not a multipart upload",
            f"send a multipart/form-data body with images or zip archives in the field {FILES!r}",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise _bad_multipart("the Content-Type multipart/form-data has no boundary parameter")
    length = request.headers.get("content-length")
    declared = int(length) if length is not None else None  # RequestGuard checked it is a number
    parts = _Parts(writer, max_field_bytes, max_files)
    parser = _parser(boundary, parts)
    await _feed_body(request, parser, declared)
    if parser.state != MultipartState.END:
        raise _bad_multipart(
            "the body ends before the closing boundary: the upload was cut off (send it again)"
        )
    return parts.fields
