"""Run controls for tests that interrupt a run part way."""

from __future__ import annotations

from cpp.progress import ProgressEvent, RunControl


def cancel_after(done: int, stage: str = "embed") -> RunControl:
    """A control that asks to cancel once ``stage`` reports ``done`` or more items."""
    control = RunControl()

    def on_progress(event: ProgressEvent) -> None:
        if event.stage == stage and event.done >= done:
            control.cancel()

    control.on_progress = on_progress
    return control
