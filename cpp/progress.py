"""Progress reporting and cooperative cancellation shared by the CLI, the service and the library."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class Cancelled(Exception):
    """Raised between batches when a run's cancel token has been set."""


@dataclass(frozen=True)
class ProgressEvent:
    """A snapshot of one stage's progress (``total`` may be unknown)."""

    stage: str
    done: int
    total: int | None
    rate: float | None = None  # items per second
    eta_s: float | None = None


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class RunControl:
    """What a long-running library call needs from its caller: a progress sink and a cancel flag."""

    on_progress: ProgressCallback | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)

    def check_cancelled(self) -> None:
        """Raise :class:`Cancelled` if cancellation was requested."""
        if self.cancel_event.is_set():
            raise Cancelled("the run was cancelled")

    def cancel(self) -> None:
        self.cancel_event.set()

    def stage(self, name: str, total: int | None) -> StageReporter:
        """Start reporting one stage."""
        return StageReporter(self, name, total)


class StageReporter:
    """Reports ``done``/``total`` of one stage with rate and ETA, and checks cancellation."""

    def __init__(self, control: RunControl, name: str, total: int | None) -> None:
        self._control = control
        self.name = name
        self.total = total
        self.done = 0
        self._start = time.perf_counter()
        self._emit()

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items done, report, and raise :class:`Cancelled` if asked to stop."""
        self.done += n
        self._emit()
        self._control.check_cancelled()

    def _emit(self) -> None:
        if self._control.on_progress is None:
            return
        elapsed = time.perf_counter() - self._start
        rate = self.done / elapsed if elapsed > 0 and self.done else None
        eta = (self.total - self.done) / rate if rate and self.total is not None else None
        self._control.on_progress(ProgressEvent(self.name, self.done, self.total, rate, eta))
