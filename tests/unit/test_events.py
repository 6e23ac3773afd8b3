"""Events on the wire and the ProgressListener contract."""

from __future__ import annotations

import logging

import pytest

from orchestrator.engine.events import Event, ProgressListener, deliver


def test_a_stream_entry_decodes_into_an_event_and_back_to_its_wire_form() -> None:
    event = Event.from_stream(
        "r1",
        "0-7",
        {"type": "step_failed", "step": "a", "attempt": "2", "ts": "1795634626.5", "data": '{"status":400}'},
    )

    assert (event.seq, event.type, event.step, event.attempt, event.data) == (7, "step_failed", "a", 2, {"status": 400})
    wire = event.to_json()
    assert wire["ts"] == "2026-11-25T19:23:46.500000+00:00"
    assert wire["run_id"] == "r1"
    assert Event.from_stream("r1", "0-1", {"type": "run_started", "step": "", "attempt": "0", "ts": "1"}).step is None


class _Recorder(ProgressListener):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def on_event(self, event: Event) -> None:
        self.calls.append(("event", event.seq))

    def on_step_start(self, event: Event) -> None:
        self.calls.append(("start", event.seq))

    def on_step_complete(self, event: Event) -> None:
        raise RuntimeError("listener bug")

    def on_workflow_complete(self, event: Event) -> None:
        self.calls.append(("complete", event.seq))


def test_each_event_reaches_its_callback_and_a_raising_listener_is_only_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = _Recorder()
    events = [
        Event("r1", 1, "step_started", "a", 1, 1.0),
        Event("r1", 2, "step_succeeded", "a", 1, 2.0),
        Event("r1", 3, "run_succeeded", None, 0, 3.0),
        Event("r1", 4, "some_future_type", None, 0, 4.0),
    ]
    with caplog.at_level(logging.ERROR, logger="orchestrator.engine.events"):
        for event in events:
            deliver(listener, event)

    assert listener.calls == [("event", 1), ("start", 1), ("event", 2), ("event", 3), ("complete", 3), ("event", 4)]
    assert "on_step_complete" in caplog.text
    assert "listener bug" in caplog.text
