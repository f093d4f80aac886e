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
import re
from collections.abc import Sequence
from pathlib import Path

from cpp.options import BUILTIN_VOCABULARIES, CAPTIONS, ClusterOptions, SourceSpec
from service.problems import ApiProblem

MAX_SHARDS = 100_000
#: Longest file or folder name, and longest path, in bytes (the usual file system limits).
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4095
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
_WILDCARD = re.compile(r"[*?\[{]")


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


def _pattern_size(pattern: str) -> int:
    sizes = []
    for body in _BRACE.findall(pattern):
        numeric = _RANGE.match(body)
        sizes.append(int(numeric.group(2)) - int(numeric.group(1)) + 1 if numeric else body.count(",") + 1)
    return math.prod(max(size, 1) for size in sizes)


def _check_shards(pattern: str, roots: Sequence[Path]) -> None:
    """Check a shard pattern without expanding it: its size, no wildcards in folders, and its fixed leading
    folder inside the roots (the job checks every shard it opens)."""
    if _pattern_size(pattern) > MAX_SHARDS:
        raise _bad_source(f"source.path {pattern!r} names over {MAX_SHARDS} shards")
    if any(ch in os.path.dirname(pattern) for ch in "*?["):
        raise _bad_source(
            f"source.path {pattern!r}: wildcards are allowed in file names only, not in folders"
        )
    if ".." in _BRACE.sub(lambda m: "" if _RANGE.match(m.group(1)) else m.group(0), pattern):
        raise _forbidden("source.path", pattern, "'..' is not allowed in paths")
    first = _WILDCARD.search(pattern)
    if first is None:
        check_path(pattern, roots, "source.path", must_exist="file")
        return
    fixed = os.path.dirname(pattern[: first.start()]) or "/"
    check_path(fixed, roots, "source.path", must_exist="dir")
    _check_name_lengths(_longest_expansion(pattern), "source.path")


def _longest_expansion(pattern: str) -> str:
    """``pattern`` with each brace group replaced by its longest alternative (the longest name it makes)."""

    def longest(match: re.Match[str]) -> str:
        numeric = _RANGE.match(match.group(1))
        options = numeric.groups() if numeric else match.group(1).split(",")
        return max(options, key=lambda option: len(option.encode("utf-8", errors="surrogatepass")))

    return _BRACE.sub(longest, pattern)


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
