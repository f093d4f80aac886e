"""``cpp gallery CLUSTERING --out site/``: a static, read-only gallery that opens from ``file://``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cpp.cli.common import add_option, check_output
from cpp.options import GalleryOptions


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "gallery",
        help="write a static HTML gallery of a clustering",
        description="Write a self-contained folder (HTML, script, style, data and thumbnails) showing the "
        "newest revision of a clustering: an overview of the clusters, a page per cluster, the map and the "
        "run. It opens from disk without a server (site/index.html); share the folder as it is.",
    )
    parser.add_argument(
        "clustering",
        type=Path,
        help="a `cpp cluster` work directory, a service job's folder, or its result JSON",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (an existing gallery is replaced)"
    )
    add_option(parser, GalleryOptions, "members", metavar="N")
    parser.set_defaults(func=run, quiet=True)


def run(args: argparse.Namespace) -> int:
    out = check_output(args.out, "--out", directory=True)
    from cpp import clustering
    from cpp.gallery import write_site

    opened = clustering.open(args.clustering)
    counts = write_site(opened, out, per_cluster=args.members)
    missing = f"; {counts['failed']} images could not be read" if counts["failed"] else ""
    made = f"{counts['clusters']} clusters, {counts['thumbnails']} thumbnails"
    print(f"wrote {out / 'index.html'}: {made}{missing}")
    return 0
