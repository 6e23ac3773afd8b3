"""Where spans go and what exporting them costs: the console exporter on stderr, a quiet and bounded OTLP export."""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from orchestrator.telemetry import trace_provider, tracing

pytestmark = pytest.mark.timeout(30)

_TRACING_VARS = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_BSP_SCHEDULE_DELAY",
    "ORCH_TRACE_FILE",
    "ORCH_TRACE_FLUSH_S",
)


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No tracing variable but those the test sets; the tracer is rebuilt from them and dropped afterwards."""
    for name in _TRACING_VARS:
        monkeypatch.delenv(name, raising=False)
    trace_provider.reset()
    try:
        yield monkeypatch
    finally:
        trace_provider.reset()


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_the_console_exporter_writes_spans_to_stderr_never_stdout(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environment.setenv("OTEL_TRACES_EXPORTER", "console")
    run_id = uuid.uuid4().hex

    with tracing.submit_span(run_id, "wf"):
        pass

    out, err = capsys.readouterr()
    assert out == ""
    assert json.loads(err)["name"] == "submit wf"


def test_an_unreachable_collector_costs_one_log_line_and_a_bounded_flush(
    environment: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    environment.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    environment.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")  # the background export starts (and backs off) at once
    environment.setenv("ORCH_TRACE_FLUSH_S", "0.5")
    caplog.set_level(logging.DEBUG)

    tracer = trace_provider.tracer()
    assert tracer is not None
    for index in range(3):
        tracer.start_span(f"span {index}").end()
    started = time.monotonic()
    trace_provider.shutdown()
    elapsed = time.monotonic() - started

    assert elapsed < 2.0, f"the exit flush took {elapsed:.1f}s with a budget of 0.5s"
    (line,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert line.name == "orchestrator.telemetry.otlp_export"
    assert "could not send spans to http://127.0.0.1:" in line.getMessage()
    assert "\n" not in line.getMessage()
    assert line.exc_info is None
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")], "the exporter's retries show"


@pytest.mark.parametrize("value", ["-1", "soon", "1e9", "nan"])
def test_a_flush_budget_that_is_not_a_bounded_number_of_seconds_is_named_and_replaced(
    environment: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    environment.setenv("ORCH_TRACE_FILE", "/dev/null")
    environment.setenv("ORCH_TRACE_FLUSH_S", value)

    assert trace_provider.tracer() is not None
    (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"ORCH_TRACE_FLUSH_S={value!r}" in record.getMessage()
    assert f"using {trace_provider.DEFAULT_FLUSH_S:g}" in record.getMessage()
