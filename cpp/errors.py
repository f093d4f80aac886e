"""Errors a user can act on: the message says what was wrong, with which file or field, and what to do."""


class CppError(Exception):
    """Base class of user-facing errors; the CLI prints the message and exits with status 2."""


class SourceError(CppError):
    """A source specification cannot be read (missing path, bad pattern, unreadable list)."""


class OutputPathError(CppError):
    """An output path cannot be written: its directory is missing or read-only, or it is the wrong kind."""


class MissingExtraError(CppError):
    """A command needs an optional part of cpp that is not installed (e.g. ``cpp[service]``)."""
