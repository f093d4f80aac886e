"""Options shared by several commands: the SOURCE options and the ``--clusters`` value."""

from __future__ import annotations

import argparse
from typing import Literal

from cpp.options import SourceSpec
from cpp.sources import infer_source_spec

MIN_CLUSTERS = 2


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--source-type``, ``--labels-from-folders`` and ``--annotations``."""
    parser.add_argument(
        "--source-type",
        choices=["folder", "files", "webdataset", "coco"],
        default=None,
        help="source type (default: inferred from SOURCE)",
    )
    parser.add_argument(
        "--labels-from-folders", action="store_true", help="folder sources: parent folder = label"
    )
    parser.add_argument(
        "--annotations", nargs="+", default=[], help="coco sources: instances/captions JSON files"
    )


def source_from_args(args: argparse.Namespace) -> SourceSpec:
    """The source that ``args.source`` and the options of :func:`add_source_arguments` describe."""
    return infer_source_spec(
        args.source,
        args.source_type,
        labels_from_folders=args.labels_from_folders,
        annotations=args.annotations,
    )


def clusters_arg(value: str) -> Literal["auto"] | int:
    """argparse type of ``--clusters``: ``auto`` or a whole number of at least 2."""
    if value == "auto":
        return "auto"
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a whole number, got {value!r}") from None
    if k < MIN_CLUSTERS:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_CLUSTERS}, got {k}")
    return k
