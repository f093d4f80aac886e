"""Server-side path policy: jobs read only under ``CPP_ALLOWED_ROOTS``.

At submission, paths are resolved (symbolic links followed), ``..`` is refused and what can be checked
cheaply is checked (existence, name lengths, shard pattern size), so a bad request fails at once with a
problem. Shard patterns are not expanded here, and file lists are not read: the job does that, and checks
every file it opens against the roots again (:mod:`cpp.sources`), so links changed after submission cannot
lead it outside.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from cpp.errors import SourceError
from cpp.options import BUILTIN_VOCABULARIES, CAPTIONS, ClusterOptions, SourceSpec
from cpp.service.problems import ApiProblem
from cpp.sources import BraceGroup, parse_braces

MAX_SHARDS = 100_000
#: Longest file or folder name, and longest path, in bytes (the usual file system limits).
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4095
#: What makes a shard path a pattern: glob wildcards and brace groups.
_PATTERN_CHARS = "*?[{}"


def _forbidden(field: str, value: str, why: str) -> ApiProblem:
    return ApiProblem(403, "path-not-allowed", "Path not allowed", f"{field} {value!r}: {why}")


def check_path(value: str, roots: Sequence[Path], field: str, *, must_exist: str | None = None) -> Path:
    """Resolve ``value`` and require it under one of ``roots``; raise a 403 problem otherwise.

    ``must_exist`` (``"dir"`` or ``"file"``) also requires it to exist as that (422 otherwise).
    """
    if not roots:
        raise _forbidden(field, value, "this server reads no server-side paths (CPP_ALLOWED_ROOTS is empty)")
    if not os.path.isabs(value):
        raise _forbidden(field, value, "give an absolute path")
    if ".." in value:
        raise _forbidden(field, value, "'..' is not allowed in paths")
    if "\x00" in value:
        raise _forbidden(field, value, "NUL bytes are not allowed in paths")
    _check_name_lengths(value, field)
    resolved = Path(value).resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise _forbidden(field, value, "it is outside the allowed roots (symbolic links are followed)")
    if must_exist == "dir" and not resolved.is_dir():
        raise _bad_source(f"{field} {value!r} is not an existing folder")
    if must_exist == "file" and not resolved.is_file():
        raise _bad_source(f"{field} {value!r} is not an existing file")
    return resolved


def _bad_source(detail: str) -> ApiProblem:
    return ApiProblem(422, "bad-source", "Source not usable", detail)


def _check_name_lengths(value: str, field: str) -> None:
    if len(value.encode("utf-8", errors="surrogatepass")) > MAX_PATH_BYTES:
        raise _bad_source(f"{field}: the path is over {MAX_PATH_BYTES} bytes, more than a file system allows")
    for name in value.split("/"):
        if len(name.encode("utf-8", errors="surrogatepass")) > MAX_NAME_BYTES:
            raise _bad_source(
                f"{field}: the name {name[:40]!r}... is over {MAX_NAME_BYTES} bytes, longer than a file "
                "system allows"
            )


def _check_shards(pattern: str, roots: Sequence[Path]) -> None:
    """Check a shard pattern without expanding it: its fixed leading folder inside the roots first (outside
    is a 403 whatever the syntax), then its brace groups and size, no wildcards in folders, no ``..`` and
    the length of the longest name it makes (the job checks every shard it opens)."""
    first = next((i for i, ch in enumerate(pattern) if ch in _PATTERN_CHARS), None)
    if first is None:
        check_path(pattern, roots, "source.path", must_exist="file")
        return
    check_path(os.path.dirname(pattern[:first]) or "/", roots, "source.path", must_exist="dir")
    try:
        parts = parse_braces(pattern)
    except SourceError as exc:
        raise _bad_source(f"source.path: {exc}") from None
    if math.prod(len(part) for part in parts if isinstance(part, BraceGroup)) > MAX_SHARDS:
        raise _bad_source(f"source.path {pattern!r} names over {MAX_SHARDS} shards")
    if any(ch in os.path.dirname(pattern) for ch in "*?["):
        raise _bad_source(
            f"source.path {pattern!r}: wildcards are allowed in file names only, not in folders"
        )
    # the ``..`` of a number range is no parent folder; alternatives are kept as written
    unranged = (part if isinstance(part, str) or part.numbers is None else "" for part in parts)
    if ".." in "".join(part if isinstance(part, str) else part.text for part in unranged):
        raise _forbidden("source.path", pattern, "'..' is not allowed in paths")
    longest = "".join(part if isinstance(part, str) else part.longest() for part in parts)
    _check_name_lengths(longest, "source.path")


def check_request_paths(source: SourceSpec, options: ClusterOptions, roots: Sequence[Path]) -> None:
    """Check the server-side paths of a request: source, annotations and vocabulary files."""
    if source.type == "webdataset":
        _check_shards(source.path, roots)
    else:
        check_path(source.path, roots, "source.path", must_exist="file" if source.type == "files" else "dir")
    for annotation in source.annotations:
        check_path(annotation, roots, "source.annotations", must_exist="file")
    check_vocabulary_paths(options, roots)


def check_vocabulary_paths(options: ClusterOptions, roots: Sequence[Path]) -> None:
    """Check the vocabulary files a request names (uploads too: their images are uploaded, not these)."""
    for spec in options.vocabulary:
        if spec not in BUILTIN_VOCABULARIES and spec != CAPTIONS:
            check_path(spec, roots, "options.vocabulary", must_exist="file")
