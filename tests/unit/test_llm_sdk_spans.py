"""The Anthropic SDK's own spans (``sdk_span_options`` in ``orchestrator/llm/anthropic.py``): made only where a
tracer provider receives them."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator.llm.anthropic import sdk_span_options
from orchestrator.llm.base import LLMRequest
from orchestrator.llm.offline import OfflineClient

pytestmark = pytest.mark.timeout(30)

REQUEST = LLMRequest(model="claude-haiku-4-5", prompt="Summarise the release notes.", max_tokens=50)


@pytest.fixture
def tracers_asked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The instrumentation scopes anything asks OpenTelemetry for a tracer of, from now on."""
    asked: list[str] = []
    real = trace.get_tracer

    def get_tracer(scope: str, *args: Any, **kwargs: Any) -> trace.Tracer:
        asked.append(scope)
        return real(scope, *args, **kwargs)

    monkeypatch.setattr(trace, "get_tracer", get_tracer)
    return asked


def test_with_no_tracing_anywhere_the_sdk_makes_no_span_for_a_call(tracing_off: None, tracers_asked: list[str]) -> None:
    assert sdk_span_options() == {"open_telemetry": False}
    client = OfflineClient()

    reply = client.complete(REQUEST)

    assert reply.text
    assert tracers_asked == [], "the SDK never asked OpenTelemetry for a tracer"


def test_with_the_orchestrators_tracing_on_the_sdk_keeps_its_default(
    spans: InMemorySpanExporter, tracers_asked: list[str]
) -> None:
    assert sdk_span_options() == {}
    client = OfflineClient()

    client.complete(REQUEST)

    assert len(tracers_asked) == 1, "the SDK asked OpenTelemetry for its tracer"


def test_an_applications_global_tracer_provider_receives_the_sdks_span_of_each_call(
    tracing_off: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    client = OfflineClient()

    client.complete(REQUEST)

    models = [span.attributes.get("gen_ai.request.model") for span in exporter.get_finished_spans() if span.attributes]
    assert models == ["claude-haiku-4-5"]
