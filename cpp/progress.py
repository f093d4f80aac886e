"""Progress reporting and cooperative cancellation: the one progress system of the CLI, the service and the
library.

Long calls take a :class:`RunControl` and report each stage through the :class:`StageReporter` that
:meth:`RunControl.stage` hands out. A reporter sends :class:`ProgressEvent` records to ``on_progress`` (the
service keeps the latest as a job's progress) and, when the control's ``bars`` is on, draws a tqdm bar on
stderr. ``bars`` defaults to the process-wide switch of :func:`cpp.logging.enable_progress_bars`: on in the
CLI (unless ``--quiet``), off in the service and in library use.

The stages, in the order a clustering run reports them, are the keys of :data:`STAGES`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cpp.logging import progress_bars_enabled

if TYPE_CHECKING:
    from tqdm import tqdm

#: Every stage a run reports, with what its ``done``/``total`` count.
STAGES: dict[str, str] = {
    "embed": "images decoded and encoded into the feature store (source items)",
    "fit": "epochs of head training (one step when no head is trained or a saved one is reused)",
    "readout": "candidate numbers of clusters scored, then the chosen one",
    "assign": "images assigned to the clusters found on a sample (collections larger than the readout's "
    "sample only)",
    "name": "vocabulary names embedded, then the two naming passes",
}


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
    """What a long-running library call needs from its caller: a progress sink, progress bars or not, and a
    cancel flag."""

    on_progress: ProgressCallback | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    bars: bool = field(default_factory=progress_bars_enabled)
    _current: StageReporter | None = field(default=None, init=False, repr=False)

    def check_cancelled(self) -> None:
        """Raise :class:`Cancelled` if cancellation was requested."""
        if self.cancel_event.is_set():
            raise Cancelled("the run was cancelled")

    def cancel(self) -> None:
        self.cancel_event.set()

    def stage(self, name: str, total: int | None, *, unit: str = "it", initial: int = 0) -> StageReporter:
        """Start reporting stage ``name`` (one of :data:`STAGES`) of ``total`` items, ``initial`` of them
        done already (a resumed run); the previous stage's bar is closed. Raises :class:`Cancelled` if
        cancellation was requested."""
        if name not in STAGES:
            raise ValueError(f"unknown progress stage {name!r}; stages are {', '.join(STAGES)}")
        if self._current is not None:
            self._current.close()
        self._current = StageReporter(self, name, total, unit=unit, initial=initial)
        if self.cancel_event.is_set():
            self._current.close()
            self.check_cancelled()
        return self._current


class StageReporter:
    """Reports ``done``/``total`` of one stage with rate and ETA (and its bar), and checks cancellation."""

    def __init__(
        self, control: RunControl, name: str, total: int | None, *, unit: str = "it", initial: int = 0
    ) -> None:
        self._control = control
        self.name = name
        self.total = total
        self.done = self._initial = initial
        self._start = time.perf_counter()
        self._bar: tqdm | None = _bar(name, total, unit, initial) if control.bars else None
        self._emit()

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items done, report, and raise :class:`Cancelled` if asked to stop."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if self.total is not None and self.done >= self.total:
                self.close()
        self._emit()
        self._control.check_cancelled()

    def show(self, **values: str) -> None:
        """Show ``values`` (e.g. the latest loss) beside the bar; progress records do not carry them."""
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        """Finish the bar (the stage's records need no closing)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _emit(self) -> None:
        if self._control.on_progress is None:
            return
        elapsed = time.perf_counter() - self._start
        counted = self.done - self._initial
        rate = counted / elapsed if elapsed > 0 and counted else None
        eta = (self.total - self.done) / rate if rate and self.total is not None else None
        self._control.on_progress(ProgressEvent(self.name, self.done, self.total, rate, eta))


def _bar(name: str, total: int | None, unit: str, initial: int) -> tqdm:
    from tqdm.auto import tqdm  # only where bars are drawn: not at import (start-up time)

    return tqdm(total=total, initial=initial, desc=name, unit=unit, smoothing=0.1, dynamic_ncols=True)
