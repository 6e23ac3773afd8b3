"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator.llm import AnthropicClient
from orchestrator.telemetry import trace_provider
from tests.fake_anthropic import FakeAnthropicServer, fake_anthropic_server


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


@pytest.fixture
def anthropic_server() -> Iterator[FakeAnthropicServer]:
    """A local Messages API answering what the test queues (``tests/fake_anthropic.py``)."""
    with fake_anthropic_server() as fake:
        yield fake


@pytest.fixture
def sdk_client(anthropic_server: FakeAnthropicServer) -> Iterator[AnthropicClient]:
    """The real SDK's client, talking HTTP to ``anthropic_server``."""
    with AnthropicClient(api_key="test-key", base_url=anthropic_server.base_url, timeout_s=10) as client:
        yield client
