"""One library logger and one global progress-bar switch (on in the CLI, off in the service): the default of
:attr:`cpp.progress.RunControl.bars`."""

from __future__ import annotations

import logging
import sys

_LIBRARY_LOGGER = "cpp"
_progress_bars_enabled = False


def get_logger(name: str | None = None) -> logging.Logger:
    """Return the library logger, or a child of it (``cpp.<name>``)."""
    if name is None or name == _LIBRARY_LOGGER:
        return logging.getLogger(_LIBRARY_LOGGER)
    if name.startswith(_LIBRARY_LOGGER + "."):
        return logging.getLogger(name)
    return logging.getLogger(f"{_LIBRARY_LOGGER}.{name}")


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (test runners and notebooks swap it after set-up)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def set_verbosity(level: int) -> None:
    """Set the level of the library logger and give it a stderr handler if it has none."""
    logger = get_logger()
    logger.setLevel(level)
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False  # libraries that log via the root logger must not duplicate our lines


def enable_progress_bars() -> None:
    """Show progress bars in the run controls made from now on (the CLI does this)."""
    global _progress_bars_enabled
    _progress_bars_enabled = True


def disable_progress_bars() -> None:
    """Hide progress bars (the default, and what the service uses)."""
    global _progress_bars_enabled
    _progress_bars_enabled = False


def progress_bars_enabled() -> bool:
    return _progress_bars_enabled
