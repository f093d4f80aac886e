"""``cpp export CLUSTERING --format json|csv|coco|folders --out X``: the newest revision of a clustering."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cpp.cli.common import add_option, check_output
from cpp.options import ExportOptions


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a clustering (its newest revision) as JSON, CSV, COCO or folders",
        description="Export the newest revision of a clustering: the result JSON with every assignment "
        "inline, a CSV, COCO-style image-level labels, or a folder per cluster of symbolic links to the "
        "images (images inside tar shards are written out as files).",
    )
    parser.add_argument(
        "clustering",
        type=Path,
        help="a `cpp cluster` work directory, a service job's folder, or its result JSON",
    )
    add_option(parser, ExportOptions, "format")
    parser.add_argument(
        "--out", type=Path, required=True, help="output file (a new folder for --format folders)"
    )
    parser.set_defaults(func=run, quiet=True)


def run(args: argparse.Namespace) -> int:
    out = check_output(args.out, "--out", directory=args.format == "folders")
    from cpp import clustering
    from cpp.export import export

    opened = clustering.open(args.clustering)
    export(opened, args.format, out)
    print(f"wrote revision {opened.revision} of {args.clustering} as {args.format} to {out}")
    return 0
