"""What telemetry records: one step attempt, how it ended, one LLM call (values shared by every backend)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AttemptInfo:
    """One attempt of one step, as the worker starts it.

    Attributes:
        run_id: The run (its 32-hex id is also the run's trace id).
        workflow: The workflow's name.
        step: The step's name.
        kind: ``llm``, ``python``, ``noop`` or ``approval``.
        attempt: 1-based attempt number in this generation.
        task_id: The Celery task id of this delivery.
        queue: The queue the message came from.
        queued_at: When the step was queued (epoch seconds, Redis clock), for the queue-wait histogram.
        started_at: When the attempt was claimed (epoch seconds, Redis clock).
        headers: The Celery message headers (they carry the trace context).
        due_at: When a delayed message (a retry's or a deferral's countdown) became due, if it was delayed.
    """

    run_id: str
    workflow: str
    step: str
    kind: str
    attempt: int
    task_id: str
    queue: str
    queued_at: float | None
    started_at: float
    headers: Mapping[str, Any] = field(default_factory=dict)
    due_at: float | None = None

    @property
    def queue_wait_s(self) -> float | None:
        """Seconds the step waited for a worker: from queued (or, when delayed, from due) to started."""
        if self.queued_at is None:
            return None
        return max(0.0, self.started_at - max(self.queued_at, self.due_at or 0.0))


@dataclass
class AttemptScope:
    """What the attempt came to; set by the step task before the scope closes.

    Attributes:
        info: The attempt.
        outcome: ``succeeded``, ``failed``, ``skipped``, ``retry``, ``deferred``, ``waiting`` or ``stale``.
        error_kind: The error's kind for ``failed`` and ``retry`` (``rate_limit``, ``budget_exceeded`` …).
        cost_usd: What the attempt's LLM calls cost.
        failure: One line naming the step and its error when this attempt recorded the step's final failure.
        entered_monotonic: When the attempt's scope was entered (``time.monotonic()``), for its duration.
    """

    info: AttemptInfo
    outcome: str = "unknown"
    error_kind: str | None = None
    cost_usd: float = 0.0
    failure: str | None = None
    entered_monotonic: float = field(default_factory=time.monotonic)

    def finish(self, outcome: str, error_kind: str | None = None) -> None:
        """Record how the attempt ended."""
        self.outcome = outcome
        self.error_kind = error_kind


@dataclass(frozen=True)
class LLMCallRecord:
    """One LLM call made (or served from the cache) inside an attempt.

    Attributes:
        workflow: The workflow's name.
        model: The model asked.
        input_tokens: Input tokens billed (or that the cached reply had).
        output_tokens: Output tokens billed.
        cost_usd: What it cost; 0 when served from the cache, ``None`` when the model has no price.
        cached: Served from the content-hash cache rather than the provider.
        duration_s: Wall time of the call.
        error_kind: Why the call failed, or ``None``.
        response_model: The model the reply names (a dated id, say), when there was a reply.
    """

    workflow: str
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = 0.0
    cached: bool = False
    duration_s: float = 0.0
    error_kind: str | None = None
    response_model: str | None = None
