"""The SOURCE options shared by ``cpp embed`` and ``cpp cluster``."""

from __future__ import annotations

import argparse

from cpp.options import SourceSpec
from cpp.sources import infer_source_spec


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
