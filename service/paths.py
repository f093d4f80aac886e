"""Server-side path policy: jobs read only under ``CPP_ALLOWED_ROOTS``.

Paths are resolved (symbolic links followed) and ``..`` is refused, so nothing escapes the roots.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cpp.errors import CppError
from cpp.options import ClusterOptions, SourceSpec
from cpp.sources import expand_braces, iter_items
from cpp.vocab import BUILTIN_VOCABULARIES, CAPTIONS
from service.problems import ApiProblem

MAX_SHARDS = 100_000
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def _forbidden(field: str, value: str, why: str) -> ApiProblem:
    return ApiProblem(403, "path-not-allowed", "Path not allowed", f"{field} {value!r}: {why}")


def check_path(value: str, roots: Sequence[Path], field: str) -> Path:
    """Resolve ``value`` and require it under one of ``roots``; raise a 403 problem otherwise."""
    if not roots:
        raise _forbidden(field, value, "this server reads no server-side paths (CPP_ALLOWED_ROOTS is empty)")
    if not os.path.isabs(value):
        raise _forbidden(field, value, "give an absolute path")
    if ".." in value:
        raise _forbidden(field, value, "'..' is not allowed in paths")
    if "\x00" in value:
        raise _forbidden(field, value, "NUL bytes are not allowed in paths")
    resolved = Path(value).resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise _forbidden(field, value, "it is outside the allowed roots (symbolic links are followed)")
    return resolved


def _pattern_size(pattern: str) -> int:
    sizes = []
    for body in _BRACE.findall(pattern):
        numeric = _RANGE.match(body)
        sizes.append(int(numeric.group(2)) - int(numeric.group(1)) + 1 if numeric else body.count(",") + 1)
    return math.prod(max(size, 1) for size in sizes)


def _check_shards(pattern: str, roots: Sequence[Path]) -> None:
    if _pattern_size(pattern) > MAX_SHARDS:
        raise ApiProblem(
            422, "bad-source", "Source not usable", f"source.path {pattern!r} names over {MAX_SHARDS} shards"
        )
    for candidate in expand_braces(pattern):
        directory, name = os.path.split(candidate)
        if any(ch in directory for ch in "*?["):
            raise ApiProblem(
                422,
                "bad-source",
                "Source not usable",
                f"source.path {pattern!r}: wildcards are allowed in file names only, not in folders",
            )
        check_path(directory or "/", roots, "source.path")
        if not any(ch in name for ch in "*?["):
            check_path(candidate, roots, "source.path")


def check_request_paths(source: SourceSpec, options: ClusterOptions, roots: Sequence[Path]) -> None:
    """Check every server-side path a job would read: source, annotations, listed files, vocabulary files."""
    try:
        if source.type == "webdataset":
            _check_shards(source.path, roots)
        else:
            check_path(source.path, roots, "source.path")
        for annotation in source.annotations:
            check_path(annotation, roots, "source.annotations")
        if source.type == "files":
            for item in iter_items(source):
                check_path(item.path or item.key, roots, f"an entry of file list {source.path}")
    except CppError as exc:
        raise ApiProblem(422, "bad-source", "Source not usable", str(exc)) from exc
    for spec in options.vocabulary:
        if spec not in BUILTIN_VOCABULARIES and spec != CAPTIONS:
            check_path(spec, roots, "options.vocabulary")
