"""Errors a user can act on: the message says what was wrong, with which file or field, and what to do."""


class CppError(Exception):
    """Base class of user-facing errors; the CLI prints the message and exits with status 2."""


class SourceError(CppError):
    """A source specification cannot be read (missing path, bad pattern, unreadable list)."""


class OptionError(CppError):
    """A bad value of one option. ``option`` is its name where it was given: a library argument or model
    field (``batch_size``), which the CLI shows as its flag (``--batch-size``)."""

    def __init__(self, option: str, problem: str, *, value: object = None) -> None:
        self.option, self.problem, self.value = option, problem, value
        super().__init__(self.named(option))

    def named(self, name: str) -> str:
        """The message with the option called ``name``: ``NAME VALUE: PROBLEM``."""
        return f"{name}{'' if self.value is None else f' {self.value!r}'}: {self.problem}"


class OutputPathError(CppError):
    """An output path cannot be written: its directory is missing or read-only, or it is the wrong kind."""


class MissingExtraError(CppError):
    """A command needs an optional part of cpp that is not installed (e.g. ``cpp[service]``)."""
