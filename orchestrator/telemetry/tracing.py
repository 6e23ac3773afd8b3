"""OpenTelemetry: one trace per run, a span per step attempt. (Placeholder: filled in by the tracing work.)"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.telemetry import AttemptInfo, AttemptScope, LLMCallRecord


@contextlib.contextmanager
def attempt_span(info: AttemptInfo, scope: AttemptScope) -> Iterator[None]:
    """A span for the attempt, child of whatever dispatched it, in the run's trace."""
    yield


def record_llm_call(record: LLMCallRecord) -> None:
    """Put the call's GenAI attributes on the current span."""
