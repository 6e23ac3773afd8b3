"""The queue wait of an attempt: from queued, or from due when a retry or deferral delayed the message."""

from __future__ import annotations

from orchestrator.telemetry import AttemptInfo


def _info(queued_at: float | None, due_at: float | None = None) -> AttemptInfo:
    return AttemptInfo("r" * 32, "wf", "s", "llm", 1, "t", "llm", queued_at=queued_at, started_at=110.0, due_at=due_at)


def test_queue_wait_runs_from_queued_to_started() -> None:
    assert _info(100.0).queue_wait_s == 10.0


def test_a_delayed_message_waits_from_when_it_became_due() -> None:
    # Queued at 100 with a 9 s countdown: only the last second was waiting for a worker.
    assert _info(100.0, due_at=109.0).queue_wait_s == 1.0


def test_no_queue_time_no_wait_and_never_negative() -> None:
    assert _info(None).queue_wait_s is None
    assert _info(100.0, due_at=111.0).queue_wait_s == 0.0
