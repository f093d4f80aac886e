"""The one progress system: records, bars owned by the run control, the stage list, cancellation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from synthetic import subspace_mixture

from cpp import logging as cpp_logging
from cpp.progress import STAGES, Cancelled, ProgressEvent, RunControl
from cpp.readout import feature_readout


@pytest.fixture
def bars_off() -> Iterator[None]:
    """The library default (the CLI's ``main`` turns bars on for the rest of the process)."""
    cpp_logging.disable_progress_bars()
    yield
    cpp_logging.disable_progress_bars()


def test_records_count_from_the_initial_items_and_bars_follow_the_switch(
    capsys: pytest.CaptureFixture[str], bars_off: None
) -> None:
    events: list[ProgressEvent] = []
    quiet = RunControl(events.append)
    assert not quiet.bars
    stage = quiet.stage("embed", 10, unit="img", initial=4)
    stage.advance(3)
    assert [(e.stage, e.done, e.total) for e in events] == [("embed", 4, 10), ("embed", 7, 10)]
    assert events[0].rate is None and events[1].rate is not None and events[1].eta_s is not None
    assert capsys.readouterr().err == ""  # library use: no bar

    cpp_logging.enable_progress_bars()  # what the CLI does
    drawn = RunControl(events.append)
    assert drawn.bars
    fit = drawn.stage("fit", 2, unit="epoch")
    fit.show(loss="0.500")
    fit.advance()
    drawn.stage("name", 3, unit="name").advance(3)  # starting a stage closes the previous one's bar
    err = capsys.readouterr().err
    assert "fit:" in err and "epoch" in err and "loss=0.500" in err and "name: 100%" in err
    assert events[-1] == ProgressEvent("name", 3, 3, events[-1].rate, 0.0)


def test_unknown_stages_are_refused_and_cancellation_stops_at_the_next_stage_or_item() -> None:
    control = RunControl()
    with pytest.raises(ValueError, match="unknown progress stage 'labels'; stages are embed, fit"):
        control.stage("labels", 1)
    stage = control.stage("readout", 5)
    control.cancel()
    with pytest.raises(Cancelled):
        stage.advance()
    with pytest.raises(Cancelled):
        control.stage("name", 1)


def test_a_bar_is_closed_when_its_stage_is_cancelled_at_the_start(
    capsys: pytest.CaptureFixture[str], bars_off: None
) -> None:
    cpp_logging.enable_progress_bars()
    control = RunControl(lambda event: control.cancel())
    with pytest.raises(Cancelled):
        control.stage("fit", 4)
    assert control._current is not None and control._current._bar is None
    assert "fit:   0%" in capsys.readouterr().err


def test_a_readout_larger_than_its_sample_reports_a_documented_assign_stage() -> None:
    x, _ = subspace_mixture(300, 16, 3, 2)
    events: list[ProgressEvent] = []
    feature_readout(x, 3, control=RunControl(events.append), max_spectral=100)
    assert "assign" in STAGES and {e.stage for e in events} == {"assign"}
    assert events[-1].done == events[-1].total == 300
