"""The ``cpp`` command line: argument parsing and printing over the library calls."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from cpp import __version__
from cpp.errors import CppError
from cpp.logging import enable_progress_bars, set_verbosity

# Each module defines ``register(subparsers)``; its parser sets ``func(args) -> int``.
_COMMAND_MODULES = ("embed", "fit", "cluster", "serve", "encoders")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpp", description="Cluster images and name the clusters (CPP rate reduction + CRATE head)."
    )
    parser.add_argument("--version", action="version", version=f"cpp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"cpp.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cpp`` console script."""
    args = build_parser().parse_args(argv)
    set_verbosity(logging.DEBUG if args.verbose else logging.INFO)
    if not getattr(args, "quiet", False):
        enable_progress_bars()
    try:
        return int(args.func(args))
    except CppError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
