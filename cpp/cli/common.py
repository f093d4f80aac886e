"""What several commands share: flags built from the option models, the SOURCE and engine options, output
path checks and atomic writes. Nothing here imports torch or the other heavy libraries (see
:mod:`cpp.cli`)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from cpp.errors import CppError, OutputPathError
from cpp.options import EngineOptions, SourceSpec

if TYPE_CHECKING:
    from cpp.engines import EmbedEngine
    from cpp.progress import ProgressEvent, RunControl

#: Kernel file systems: never an output location.
SYSTEM_ROOTS = ("/proc", "/sys")

_Bound = tuple[Any, bool]  # a limit (a number) and whether it is inclusive
#: ``add_option(default=...)`` when the flag's default is the field's.
_FIELD_DEFAULT: Any = object()
_Model = TypeVar("_Model", bound=BaseModel)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what was kept and how to resume; the CLI prints ``interrupted: <message>``."""


def flag(option: str) -> str:
    """The flag of an option model field or library argument: ``batch_size`` -> ``--batch-size``."""
    return option if option.startswith("-") else f"--{option.replace('_', '-')}"


def _field_kind(field: FieldInfo) -> tuple[tuple[str, ...], type | None, list[Any]]:
    """The literal words a field accepts, its number type (``None``: words only) and its constraints."""
    annotation = field.annotation
    members = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    words: tuple[str, ...] = ()
    number: type | None = None
    constraints = list(field.metadata)
    for member in members:
        if get_origin(member) is Literal:
            words += get_args(member)
        elif get_origin(member) is Annotated:
            number, *extra = get_args(member)
            for item in extra:
                constraints.extend(item.metadata if isinstance(item, FieldInfo) else [item])
        elif member in (int, float):
            number = member
        elif member is not type(None):
            raise TypeError(f"no command-line flag for fields of type {member!r}")
    return words, number, constraints


def _bounds(constraints: list[Any]) -> tuple[_Bound | None, _Bound | None]:
    lower: _Bound | None = None
    upper: _Bound | None = None
    for constraint in constraints:
        if isinstance(constraint, annotated_types.Ge):
            lower = (constraint.ge, True)
        elif isinstance(constraint, annotated_types.Gt):
            lower = (constraint.gt, False)
        elif isinstance(constraint, annotated_types.Le):
            upper = (constraint.le, True)
        elif isinstance(constraint, annotated_types.Lt):
            upper = (constraint.lt, False)
        else:
            raise TypeError(f"no command-line check for the constraint {constraint!r}")
    return lower, upper


def _range(lower: _Bound | None, upper: _Bound | None) -> str:
    """``between 1 and 4096``, ``>= 0``, ``> 0 and <= 1``; empty without limits."""
    if lower is not None and upper is not None and lower[1] and upper[1]:
        return f"between {lower[0]} and {upper[0]}"
    parts = []
    if lower is not None:
        parts.append(f"{'>=' if lower[1] else '>'} {lower[0]}")
    if upper is not None:
        parts.append(f"{'<=' if upper[1] else '<'} {upper[0]}")
    return " and ".join(parts)


def _in_bounds(value: float, lower: _Bound | None, upper: _Bound | None) -> bool:
    if lower is not None and not (value >= lower[0] if lower[1] else value > lower[0]):
        return False
    return upper is None or (value <= upper[0] if upper[1] else value < upper[0])


def number_type(
    number: type, lower: _Bound | None, upper: _Bound | None, words: tuple[str, ...] = ()
) -> Callable[[str], Any]:
    """argparse ``type=``: one of ``words`` or a number within the limits, else a one-line error."""
    expected = " ".join(
        part
        for part in (
            " or ".join(repr(word) for word in words) + (" or" if words else ""),
            "a whole number" if number is int else "a number",
            _range(lower, upper),
        )
        if part
    )

    def parse(value: str) -> Any:
        if value in words:
            return value
        try:
            parsed = number(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {value!r}") from None
        if not math.isfinite(parsed) or not _in_bounds(parsed, lower, upper):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {value}")
        return parsed

    parse.__name__ = expected  # argparse names the type in some messages
    return parse


def _text_type(field: FieldInfo) -> Callable[[str], str]:
    """argparse ``type=`` of a text field: the value must match the field's patterns, if any."""
    patterns = [m.pattern for m in field.metadata if getattr(m, "pattern", None)]

    def parse(value: str) -> str:
        if not all(re.search(pattern, value) for pattern in patterns):
            raise argparse.ArgumentTypeError(f"must be {field.description}, got {value!r}")
        return value

    return parse


def _shown(default: Any) -> str:
    """A default as the user would type it."""
    if isinstance(default, list):
        return " ".join(map(str, default)) or "none"
    return "none" if default is None else str(default)


def _count(constraints: list[Any]) -> str:
    """``at most 16``, ``1 to 16`` values of a list field; empty without limits."""
    least = next((c.min_length for c in constraints if isinstance(c, annotated_types.MinLen)), 0)
    most = next((c.max_length for c in constraints if isinstance(c, annotated_types.MaxLen)), None)
    if most is None:
        return f"at least {least}" if least > 1 else ""
    return f"at most {most}" if least <= 1 else f"{least} to {most}"


def add_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    name: str,
    *,
    flag_name: str | None = None,
    default: Any = _FIELD_DEFAULT,
    help: str | None = None,
    default_text: str | None = None,
    **kwargs: Any,
) -> None:
    """Add ``--NAME`` (``_`` as ``-``; or ``flag_name``) for the field ``name`` of ``model`` with the field's
    default (or ``default``), its choices or a ``type=`` checking its limits (a text field: its pattern; a
    list: one or more values; a bool: a switch), and a help text showing both: the limits are declared
    once, in the model."""
    field = model.model_fields[name]
    if default is _FIELD_DEFAULT:
        default = field.get_default(call_default_factory=True)
    text = help or field.description or ""
    if field.annotation is bool:  # a switch: its default is off
        parser.add_argument(flag_name or flag(name), action="store_true", help=text, **kwargs)
        return
    notes = [f"default: {_shown(default) if default_text is None else default_text}"]
    if get_origin(field.annotation) is list:
        kwargs["nargs"] = "+"
        notes.append(_count(field.metadata))
    elif field.annotation is str:
        kwargs["type"] = _text_type(field)
    else:
        words, number, constraints = _field_kind(field)
        lower, upper = _bounds(constraints) if number is not None else (None, None)
        if number is None:
            kwargs["choices"] = words
        else:
            kwargs["type"] = number_type(number, lower, upper, words)
        notes.append(_range(lower, upper))
    parser.add_argument(
        flag_name or flag(name),
        default=default,
        help=f"{text} ({'; '.join(note for note in notes if note)})",
        **kwargs,
    )


def options_from_args(
    options: type[_Model], args: argparse.Namespace, /, *names: str, **values: Any
) -> _Model:
    """``options`` (an option model) from the flags ``names`` of ``args`` (fields of the same names) and
    ``values``; what the flags' own checks leave (e.g. too many ``--vocabulary``) is one :class:`CppError`
    line naming each refused flag as typed: ``--vocabulary: List should have at most 16 items ...``."""
    try:
        return options(**{name: getattr(args, name) for name in names}, **values)
    except ValidationError as exc:
        raise CppError("; ".join(f"{flag(str(e['loc'][0]))}: {e['msg']}" for e in exc.errors())) from None


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--source-type``, ``--labels-from-folders`` and ``--annotations``, from :class:`SourceSpec`."""
    add_option(
        parser,
        SourceSpec,
        "type",
        flag_name="--source-type",
        default=None,
        help="source type",
        default_text="inferred from SOURCE",
    )
    add_option(parser, SourceSpec, "labels_from_folders")
    add_option(parser, SourceSpec, "annotations", metavar="JSON")


def source_from_args(args: argparse.Namespace) -> SourceSpec:
    """The source that ``args.source`` and the options of :func:`add_source_arguments` describe."""
    from cpp.sources import infer_source_spec

    return infer_source_spec(
        args.source,
        args.source_type,
        labels_from_folders=args.labels_from_folders,
        annotations=args.annotations,
    )


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """``--engine``, ``--workers`` (engines on this machine) and the Ray engine's ``--ray-*`` options."""
    add_option(
        parser,
        EngineOptions,
        "engine",
        help="where images are decoded and encoded: local (PIL decoding on this machine's CPUs), "
        "device (JPEGs decoded in batches on the encoder's device, e.g. nvJPEG), auto (device when the "
        "encoder runs on CUDA, else local), ray (Ray Data actors here or on a Ray cluster; needs cpp[ray])",
    )
    add_option(
        parser,
        EngineOptions,
        "workers",
        help="decode worker processes on this machine (not with --engine ray)",
        default_text="by device",
    )
    group = parser.add_argument_group("ray engine (--engine ray)")
    group.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="Ray cluster to join, e.g. 'auto' or 'ray://head:10001' (default: $RAY_ADDRESS, else Ray "
        "is started on this machine)",
    )
    add_option(group, EngineOptions, "ray_actors", metavar="N", default_text="one per GPU, or CPU")
    add_option(
        group,
        EngineOptions,
        "ray_gpus_per_actor",
        metavar="G",
        default_text="1 when --device resolves to CUDA here, else 0",
    )
    add_option(
        group,
        EngineOptions,
        "ray_cpus_per_actor",
        metavar="C",
        default_text="1; GPU actors: the cluster's CPUs per GPU, up to 8",
    )


def engine_from_args(args: argparse.Namespace) -> EmbedEngine:
    """The engine that the options of :func:`add_engine_arguments` ask for; options of another engine are
    an error."""
    from cpp.engines import create_engine

    ray_options = {
        "address": args.ray_address,
        "actors": args.ray_actors,
        "gpus_per_actor": args.ray_gpus_per_actor,
        "cpus_per_actor": args.ray_cpus_per_actor,
    }
    if args.engine == "ray":
        if args.workers is not None:
            raise CppError(
                "--workers sets the local engine's decode processes; with --engine ray use --ray-actors"
            )
        return create_engine("ray", **ray_options)
    given = [f"--ray-{name.replace('_', '-')}" for name, value in ray_options.items() if value is not None]
    if given:
        raise CppError(f"{', '.join(given)} need --engine ray")
    return create_engine(args.engine, workers=args.workers)


def check_output(path: str | Path, flag: str, *, directory: bool) -> Path:
    """``path`` as the output of ``flag``, a directory or a file, refused at once (:class:`OutputPathError`)
    when it cannot be written: the wrong kind, under /proc or /sys, or in a directory that does not take a
    new file. Missing parent directories are created later, so the nearest existing one is tried."""
    target = Path(path)
    resolved = target.resolve()
    for root in SYSTEM_ROOTS:
        if resolved.is_relative_to(root):
            raise OutputPathError(f"{flag} {path}: {root} is a kernel file system; choose a path on disk")
    if directory and target.exists() and not target.is_dir():
        raise OutputPathError(f"{flag} {path} is a file; give a directory")
    if not directory and target.is_dir():
        raise OutputPathError(f"{flag} {path} is a directory; give a file path such as {target / 'out.json'}")
    if not directory and target.exists() and not target.is_file():
        raise OutputPathError(f"{flag} {path} exists and is not a regular file; give a file path")
    existing = resolved if directory else resolved.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{flag} {path}: {existing} is not a directory")
    try:  # a real write: os.access passes read-only mounts for root
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".cpp-write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise OutputPathError(f"{flag} {path}: cannot write in {existing} ({exc.strerror})") from None
    return target


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to, synced and renamed onto ``path`` when the block
    succeeds and removed when it fails, so that ``path`` is never left half written."""
    partial = path.with_name(f".{path.name}.tmp")
    try:
        yield partial
        handle = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def recording_control() -> tuple[RunControl, dict[str, ProgressEvent]]:
    """A run control and the latest progress event of each stage it has seen, by stage name."""
    from cpp.progress import RunControl

    latest: dict[str, ProgressEvent] = {}

    def record(event: ProgressEvent) -> None:
        latest[event.stage] = event

    return RunControl(on_progress=record), latest


def interrupted(store_dir: Path, progress: dict[str, ProgressEvent], *, also: str = "") -> Interrupted:
    """Ctrl-C during a run that embeds into ``store_dir``: what is saved there (of the total that the
    ``embed`` stage reported in ``progress``), ``also`` kept besides, and how to resume."""
    from cpp.store import RUN_FILE, FeatureStore, StoreWriter

    run_file = store_dir / RUN_FILE
    if FeatureStore.exists(store_dir):
        items = FeatureStore.open(store_dir).counts["items"]
        kept = f"the features of all {items:,} images are saved in {store_dir}"
    elif run_file.is_file():
        writer = StoreWriter(store_dir, json.loads(run_file.read_text(encoding="utf-8")))  # lists the saves
        items = writer.items_done
        total = progress["embed"].total if "embed" in progress else None
        if total is None:
            chunks, counted = f"{len(writer.chunks)} chunks", f"{items:,}"
        else:
            chunks = f"{len(writer.chunks)} of {math.ceil(total / writer.chunk_size)} chunks"
            counted = f"{items:,} of {total:,}"
        if items > sum(chunk["items"] for chunk in writer.chunks):
            chunks += " and part of the next"
        kept = f"{chunks} ({counted} images) are saved in {store_dir}"
    else:
        return Interrupted(
            f"nothing was embedded into {store_dir} yet{also}; rerun the same command to start"
        )
    return Interrupted(f"{kept}{also}; rerun the same command to resume")
