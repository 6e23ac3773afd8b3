"""Prometheus metrics of steps and LLM calls. (Placeholder: filled in by the metrics work.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.telemetry import AttemptScope, LLMCallRecord


def record_attempt(scope: AttemptScope) -> None:
    """Count the attempt's outcome and observe its duration and queue wait."""


def record_llm_call(record: LLMCallRecord) -> None:
    """Count an LLM call's tokens and cost."""


def record_deferral(workflow: str, model: str, reason: str) -> None:
    """Count a deferral."""
