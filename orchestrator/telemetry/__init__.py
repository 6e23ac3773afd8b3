"""What the orchestrator tells operators: metrics, traces and log context, behind a few calls.

The step task and the LLM gateway call only the functions here; :mod:`.metrics` (Prometheus), :mod:`.tracing`
(OpenTelemetry) and :mod:`.logs` (JSON lines with run id, step and attempt) do the work. Every call is cheap when
the backend is off, and none of them may raise into a step: telemetry failing must never fail a run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from orchestrator.telemetry import logs, metrics, tracing
from orchestrator.telemetry.records import AttemptInfo, AttemptScope, LLMCallRecord

log = logging.getLogger(__name__)

__all__ = ["AttemptInfo", "AttemptScope", "LLMCallRecord", "llm_call", "step_attempt", "step_deferred"]


@contextlib.contextmanager
def step_attempt(info: AttemptInfo) -> Iterator[AttemptScope]:
    """Wrap one attempt: log context, a span joined to the run's trace, and the step metrics when it ends."""
    scope = AttemptScope(info)
    with logs.attempt_context(info), tracing.attempt_span(info, scope):
        try:
            yield scope
        finally:
            _safely(metrics.record_attempt, scope)


def llm_call(record: LLMCallRecord) -> None:
    """Count one LLM call's tokens and cost (metrics, and attributes on the current step span)."""
    _safely(metrics.record_llm_call, record)
    _safely(tracing.record_llm_call, record)


def step_deferred(workflow: str, model: str, reason: str) -> None:
    """Count a step put back in the queue to wait for a rate limit or a provider's cool-down."""
    _safely(metrics.record_deferral, workflow, model, reason)


def _safely(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.warning("telemetry: %s failed", getattr(fn, "__qualname__", fn), exc_info=True)
