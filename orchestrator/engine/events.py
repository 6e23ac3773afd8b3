"""Progress events: one per state transition, numbered per run, kept in a Redis Stream.

Each run has a stream ``orch:{RUN}:events`` whose entry ids are ``0-SEQ``: the sequence number is assigned by the
same Lua script that makes the transition, so the stream's order is the order things happened, with no gaps. A
reader that saw up to ``seq`` asks for what came after it (``Last-Event-ID`` in SSE, ``?after=`` on the WebSocket):
nothing is missed and nothing repeats across reconnects.

:class:`ProgressListener` is the callback interface producers attach with ``Client.watch``; :func:`deliver` calls
it and never lets a listener's exception reach the caller.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from orchestrator.infra.timestamps import iso

if TYPE_CHECKING:
    from orchestrator.engine.deltas import Delta

log = logging.getLogger(__name__)


class EventType(StrEnum):
    """What happened."""

    RUN_STARTED = "run_started"
    RUN_RESUMED = "run_resumed"
    RUN_SUCCEEDED = "run_succeeded"
    RUN_FAILED = "run_failed"
    RUN_CANCELLED = "run_cancelled"
    RUN_TIMED_OUT = "run_timed_out"
    STEP_QUEUED = "step_queued"
    STEP_STARTED = "step_started"
    STEP_RETRY = "step_retry"
    STEP_DEFERRED = "step_deferred"
    STEP_SUCCEEDED = "step_succeeded"
    STEP_FAILED = "step_failed"
    STEP_SKIPPED = "step_skipped"
    STEP_UPSTREAM_FAILED = "step_upstream_failed"
    STEP_CANCELLED = "step_cancelled"
    STEP_LOST = "step_lost"
    STEP_WAITING = "step_waiting"
    STEP_ITERATION = "step_iteration"
    ITEM_STARTED = "item_started"
    ITEM_RETRY = "item_retry"
    ITEM_DEFERRED = "item_deferred"
    ITEM_SUCCEEDED = "item_succeeded"
    ITEM_FAILED = "item_failed"
    ITEM_LOST = "item_lost"
    ITEM_WAITING = "item_waiting"
    AGENT_TURN = "agent_turn"
    TOOL_CALL = "tool_call"

    @property
    def ends_run(self) -> bool:
        """Whether this is the run's last event (until a resume)."""
        return self in _RUN_ENDS


_RUN_ENDS = {EventType.RUN_SUCCEEDED, EventType.RUN_FAILED, EventType.RUN_CANCELLED, EventType.RUN_TIMED_OUT}


@dataclass(frozen=True)
class Event:
    """One transition of one run.

    Attributes:
        run_id: The run.
        seq: 1-based, per run, gapless.
        type: What happened.
        step: The step, or ``None`` for run events.
        attempt: The step's attempt number (0 for run events).
        ts: When, by Redis's clock (epoch seconds).
        data: Details: the error of a failed attempt, the retry countdown, the run's final status …
    """

    run_id: str
    seq: int
    type: str
    step: str | None
    attempt: int
    ts: float
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_stream(cls, run_id: str, entry_id: str, fields: dict[str, str]) -> Event:
        """Decode a stream entry (id ``0-SEQ``)."""
        raw = fields.get("data") or ""
        return cls(
            run_id=run_id,
            seq=int(entry_id.split("-", 1)[1]),
            type=fields.get("type", ""),
            step=fields.get("step") or None,
            attempt=int(fields.get("attempt") or 0),
            ts=float(fields.get("ts") or 0),
            data=json.loads(raw) if raw else {},
        )

    def to_json(self) -> dict[str, Any]:
        """The wire form: ``{run_id, seq, type, step, attempt, ts, data}`` with ``ts`` in ISO 8601."""
        return {
            "run_id": self.run_id,
            "seq": self.seq,
            "type": self.type,
            "step": self.step,
            "attempt": self.attempt,
            "ts": iso(self.ts),
            "data": self.data,
        }


class ProgressListener:
    """Callbacks for a run's progress; override the ones you need (each default does nothing).

    A listener that raises is logged and skipped: it can never harm the run or stop the other callbacks.
    """

    def on_workflow_start(self, event: Event) -> None:
        """The run started (or was resumed: ``event.type == "run_resumed"``)."""

    def on_step_queued(self, event: Event) -> None:
        """A step's dependencies are done and it waits for a worker."""

    def on_step_start(self, event: Event) -> None:
        """An attempt of a step started on a worker."""

    def on_step_retry(self, event: Event) -> None:
        """An attempt failed with a retryable error; ``event.data`` has the error and the countdown."""

    def on_step_deferred(self, event: Event) -> None:
        """A step went back to the queue, not counted as an attempt, to wait for a shared LLM rate limit or a
        provider's cool-down; ``event.data`` has the ``deferral`` (reason, model) and the countdown."""

    def on_step_complete(self, event: Event) -> None:
        """A step succeeded."""

    def on_step_failed(self, event: Event) -> None:
        """A step failed for good, or will not run because a dependency failed (``step_upstream_failed``)."""

    def on_step_skipped(self, event: Event) -> None:
        """A step was skipped (its condition was false, or a trigger rule said so)."""

    def on_step_cancelled(self, event: Event) -> None:
        """A step was cancelled with its run (cancel or deadline)."""

    def on_step_waiting(self, event: Event) -> None:
        """A step waits for a human decision."""

    def on_step_iteration(self, event: Event) -> None:
        """A repeated step finished an iteration (checkpointed); ``event.data`` has ``iteration`` and ``until_met``."""

    def on_agent_turn(self, event: Event) -> None:
        """An agent answered a turn: ``event.data`` has ``turn``, ``stop_reason``, ``tool_calls``, ``cached``."""

    def on_tool_call(self, event: Event) -> None:
        """An agent's tool call finished; ``event.data`` has ``turn``, ``id``, ``name`` and ``error`` (bool)."""

    def on_event(self, event: Event) -> None:
        """Every event, before its specific callback."""

    def on_delta(self, delta: Delta) -> None:
        """A piece of a streaming step's text (not an event: no ``seq``); only the API's stream hubs deliver these."""

    def on_workflow_complete(self, event: Event) -> None:
        """The run ended; ``event.type`` says how."""


_CALLBACKS = {
    EventType.RUN_STARTED: "on_workflow_start",
    EventType.RUN_RESUMED: "on_workflow_start",
    EventType.STEP_QUEUED: "on_step_queued",
    EventType.STEP_STARTED: "on_step_start",
    EventType.STEP_RETRY: "on_step_retry",
    EventType.STEP_LOST: "on_step_retry",
    EventType.STEP_DEFERRED: "on_step_deferred",
    EventType.STEP_SUCCEEDED: "on_step_complete",
    EventType.STEP_FAILED: "on_step_failed",
    EventType.STEP_UPSTREAM_FAILED: "on_step_failed",
    EventType.STEP_SKIPPED: "on_step_skipped",
    EventType.STEP_CANCELLED: "on_step_cancelled",
    EventType.STEP_WAITING: "on_step_waiting",
    EventType.STEP_ITERATION: "on_step_iteration",
    EventType.AGENT_TURN: "on_agent_turn",
    EventType.TOOL_CALL: "on_tool_call",
    EventType.RUN_SUCCEEDED: "on_workflow_complete",
    EventType.RUN_FAILED: "on_workflow_complete",
    EventType.RUN_CANCELLED: "on_workflow_complete",
    EventType.RUN_TIMED_OUT: "on_workflow_complete",
}


def deliver(listener: ProgressListener, event: Event) -> None:
    """Call the listener's callbacks for ``event``; an exception in a listener is logged, never raised."""
    names = ["on_event"]
    specific = _CALLBACKS.get(event.type)  # type: ignore[call-overload]
    if specific is not None:
        names.append(specific)
    for name in names:
        try:
            getattr(listener, name)(event)
        except Exception:
            log.exception(
                "progress listener %r failed in %s for event %s of run %s", listener, name, event.seq, event.run_id
            )
