"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator.telemetry import trace_provider


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory, for this test only."""
    exporter = InMemorySpanExporter()
    trace_provider.configure(SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        trace_provider.reset()


@pytest.fixture
def tracing_off() -> Iterator[None]:
    trace_provider.configure()
    try:
        yield
    finally:
        trace_provider.reset()
