"""The ``cpp`` command line: argument parsing and printing over the library calls.

Parsing imports only light modules (the option models, the errors), so that ``--help``, ``--version`` and
usage errors are instant: each command imports torch, open_clip, faiss, the service, ... when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from cpp import __version__
from cpp.cli.common import Interrupted, flag
from cpp.errors import CppError, OptionError

# Each module defines ``register(subparsers)``; its parser sets ``func(args) -> int``.
_COMMAND_MODULES = ("embed", "fit", "cluster", "assign", "serve", "encoders", "export", "gallery")


class _Parser(argparse.ArgumentParser):
    """Reports a usage error as one line, ``error: ...``, and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cpp", description="Cluster images and name the clusters (CPP rate reduction + CRATE head)."
    )
    parser.add_argument("--version", action="version", version=f"cpp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"cpp.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cpp`` console script: runs a command and returns the exit status (2 for a
    usage or user error, 130 for Ctrl-C, 0 after ``--help``)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the help, the version or the error line
        return int(exc.code or 0)
    from cpp.logging import enable_progress_bars, set_verbosity

    set_verbosity(logging.DEBUG if args.verbose else logging.INFO)
    if not getattr(args, "quiet", False):
        enable_progress_bars()
    try:
        return int(args.func(args))
    except OptionError as exc:  # named as the library names it: the flag of that name
        print(f"error: {exc.named(flag(exc.option))}", file=sys.stderr)
        return 2
    except CppError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc}" if isinstance(exc, Interrupted) else "interrupted", file=sys.stderr)
        return 130
