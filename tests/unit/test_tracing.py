"""Traces without Redis or workers: ids from the run, parents from message headers, attributes, the off switch."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from celery import Celery
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from orchestrator import telemetry
from orchestrator.celery_app import CeleryPublisher
from orchestrator.definition.spec import parse_workflow
from orchestrator.domain import RunStatus
from orchestrator.engine.control import resume_run, stop_run
from orchestrator.infra.settings import Settings
from orchestrator.telemetry import AttemptInfo, LLMCallRecord, trace_provider, tracing
from tests.unit.test_engine_attempt import SETTINGS, drive, make_runtime, start
from tests.unit.test_engine_attempt import workflow as engine_workflow

pytestmark = pytest.mark.timeout(30)


def _info(run_id: str, step: str = "draft", headers: dict[str, Any] | None = None, **extra: Any) -> AttemptInfo:
    fields: dict[str, Any] = {
        "workflow": "wf",
        "step": step,
        "kind": "llm",
        "attempt": 1,
        "task_id": "t1",
        "queue": "llm",
        "queued_at": 100.0,
        "started_at": 100.25,
        "headers": headers or {},
    }
    fields.update(extra)
    return AttemptInfo(run_id=run_id, **fields)


def _by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in exporter.get_finished_spans()}


def test_a_runs_trace_id_is_its_id_and_its_root_span_id_is_derived_from_it() -> None:
    run_id = uuid.uuid4().hex

    root = tracing.run_root(run_id)

    assert tracing.run_trace_id(run_id) == int(run_id, 16) == root.trace_id
    assert root.span_id != 0
    assert root == tracing.run_root(run_id), "any process derives the same root"
    assert root.span_id != tracing.run_root(uuid.uuid4().hex).span_id
    assert root.trace_flags.sampled
    other = tracing.run_trace_id("not-a-hex-run-id")
    assert other == tracing.run_trace_id("not-a-hex-run-id") != 0


def test_dispatching_outside_any_span_of_the_run_sends_no_trace_header() -> None:
    run_id = uuid.uuid4().hex

    assert tracing.dispatch_headers(run_id) == {}
    foreign = trace.NonRecordingSpan(tracing.run_root(uuid.uuid4().hex))
    with trace.use_span(foreign):
        assert tracing.dispatch_headers(run_id) == {}, "a span of another run is never the parent"


def test_a_header_sent_inside_a_span_of_the_run_comes_back_as_that_span() -> None:
    run_id = uuid.uuid4().hex
    sender = trace.SpanContext(int(run_id, 16), 0xABC, is_remote=False, trace_flags=trace.TraceFlags(1))

    with trace.use_span(trace.NonRecordingSpan(sender)):
        headers = tracing.dispatch_headers(run_id)
    parent = tracing.parent_context(run_id, headers)

    assert headers == {"traceparent": f"00-{run_id}-0000000000000abc-01"}
    assert (parent.trace_id, parent.span_id, parent.is_remote) == (sender.trace_id, 0xABC, True)


@pytest.mark.parametrize(
    "headers",
    [{}, {"traceparent": "garbage"}, {"traceparent": f"00-{uuid.uuid4().hex}-0000000000000abc-01"}, {"other": "x"}],
    ids=["none", "malformed", "another-trace", "unrelated"],
)
def test_an_attempt_without_a_usable_header_hangs_under_the_runs_root(headers: dict[str, str]) -> None:
    run_id = uuid.uuid4().hex

    assert tracing.parent_context(run_id, headers) == tracing.run_root(run_id)


def test_a_step_signature_carries_the_current_span_of_its_run_in_its_headers() -> None:
    app = Celery("t", set_as_current=False)
    settings = Settings.from_env({})
    spec = parse_workflow({"name": "wf", "steps": [{"name": "a", "uses": "noop"}]})
    run_id = uuid.uuid4().hex

    plain = CeleryPublisher(app, settings).signature(spec, run_id=run_id, step="a", generation="1")
    with trace.use_span(trace.NonRecordingSpan(tracing.run_root(run_id))):
        traced = CeleryPublisher(app, settings).signature(spec, run_id=run_id, step="a", generation="1")

    assert "traceparent" not in plain.options["headers"]
    assert tracing.parent_context(run_id, traced.options["headers"]) == tracing.run_root(run_id)


def test_an_attempt_span_carries_genai_and_orchestrator_attributes(spans: InMemorySpanExporter) -> None:
    run_id = uuid.uuid4().hex
    parent = trace.SpanContext(int(run_id, 16), 0x1234, is_remote=True, trace_flags=trace.TraceFlags(1))
    headers = {"traceparent": f"00-{run_id}-{parent.span_id:016x}-01"}

    with telemetry.step_attempt(_info(run_id, headers=headers)) as scope:
        inside = tracing.dispatch_headers(run_id)
        telemetry.llm_call(LLMCallRecord("wf", "claude-haiku-4-5", 120, 40, 0.0003, duration_s=0.5))
        telemetry.llm_call(LLMCallRecord("wf", "claude-haiku-4-5", 100, 0, 0.0, cached=True))
        scope.cost_usd = 0.0003
        scope.finish("succeeded")

    step = _by_name(spans)["wf.draft"]
    chat, cached = (s for s in spans.get_finished_spans() if s.name == "chat claude-haiku-4-5")
    assert step.context is not None
    assert step.parent is not None
    assert (step.context.trace_id, step.parent.span_id) == (int(run_id, 16), 0x1234)
    assert inside == {"traceparent": f"00-{run_id}-{step.context.span_id:016x}-01"}, "children hang under it"
    assert dict(step.attributes or {}) == {
        "orchestrator.run_id": run_id,
        "orchestrator.workflow": "wf",
        "orchestrator.step": "draft",
        "orchestrator.kind": "llm",
        "orchestrator.attempt": 1,
        "orchestrator.task_id": "t1",
        "orchestrator.queue": "llm",
        "orchestrator.queue_wait_s": 0.25,
        "orchestrator.outcome": "succeeded",
        "orchestrator.cost_usd": 0.0003,
        "orchestrator.llm_calls": 2,
        "gen_ai.system": "anthropic",
        "gen_ai.request.model": "claude-haiku-4-5",
        "gen_ai.response.model": "claude-haiku-4-5",
        "gen_ai.usage.input_tokens": 220,
        "gen_ai.usage.output_tokens": 40,
    }
    assert step.status.status_code == StatusCode.UNSET
    assert chat.parent is not None
    assert chat.parent.span_id == step.context.span_id
    assert chat.attributes is not None
    assert chat.attributes["gen_ai.usage.input_tokens"] == 120
    assert chat.attributes["gen_ai.operation.name"] == "chat"
    assert chat.attributes["orchestrator.cost_usd"] == 0.0003
    assert cached.attributes is not None
    assert cached.attributes["orchestrator.cached"] is True
    assert chat.end_time is not None
    assert chat.start_time is not None
    assert chat.end_time - chat.start_time == 500_000_000


def test_a_failed_attempt_ends_its_span_in_error_with_the_error_kind(spans: InMemorySpanExporter) -> None:
    with telemetry.step_attempt(_info(uuid.uuid4().hex)) as scope:
        scope.finish("failed", "budget_exceeded")

    span = _by_name(spans)["wf.draft"]
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["orchestrator.error_kind"] == span.attributes["error.type"] == "budget_exceeded"


def test_an_exception_escaping_the_step_passes_through_and_marks_the_span(spans: InMemorySpanExporter) -> None:
    run_id = uuid.uuid4().hex
    with pytest.raises(KeyError), telemetry.step_attempt(_info(run_id)):
        raise KeyError("bug")

    span = _by_name(spans)["wf.draft"]
    assert span.status.status_code == StatusCode.ERROR
    assert span.parent is not None
    assert span.parent.span_id == tracing.run_root(run_id).span_id
    assert trace.get_current_span() is trace.INVALID_SPAN, "the attempt's context was detached"


def _defer(info: AttemptInfo) -> None:
    with telemetry.step_attempt(info) as scope:
        scope.finish("deferred", "rate_limited")
        raise RuntimeError("given back to the broker")


def test_a_deferred_attempt_is_not_an_error(spans: InMemorySpanExporter) -> None:
    with pytest.raises(RuntimeError):
        _defer(_info(uuid.uuid4().hex))

    assert _by_name(spans)["wf.draft"].status.status_code == StatusCode.UNSET


class _Broken(SpanProcessor):
    def on_start(self, span: Any, parent_context: Any = None) -> None:
        raise RuntimeError("exporter bug")

    def on_end(self, span: Any) -> None:
        raise RuntimeError("exporter bug")


def test_a_broken_tracer_never_fails_the_step() -> None:
    trace_provider.configure(_Broken())
    try:
        with telemetry.step_attempt(_info(uuid.uuid4().hex)) as scope:
            telemetry.llm_call(LLMCallRecord("wf", "m", 1, 1))
            scope.finish("succeeded")
            ran = True
    finally:
        trace_provider.reset()

    assert ran
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_the_submit_span_hangs_under_the_runs_root_links_its_caller_and_parents_the_first_dispatch(
    spans: InMemorySpanExporter,
) -> None:
    run_id = uuid.uuid4().hex
    caller = trace.SpanContext(0xFEED, 0xBEEF, is_remote=True)

    with trace.use_span(trace.NonRecordingSpan(caller)), tracing.submit_span(run_id, "wf"):
        headers = tracing.dispatch_headers(run_id)

    submit = _by_name(spans)["submit wf"]
    assert submit.context is not None
    assert submit.parent is not None
    assert submit.context.trace_id == int(run_id, 16), "a run is its own trace, whoever submits it"
    assert submit.parent.span_id == tracing.run_root(run_id).span_id
    assert submit.kind == trace.SpanKind.PRODUCER
    assert [link.context.span_id for link in submit.links] == [0xBEEF]
    assert tracing.parent_context(run_id, headers).span_id == submit.context.span_id


def _ended(run_id: str, **fields: str) -> dict[str, str]:
    return {
        "workflow": "wf",
        "status": "succeeded",
        "gen": "1",
        "created_at": "1700000000.25",
        "finished_at": "1700000012.5",
        **fields,
    }


def test_the_runs_root_span_is_recorded_when_it_ends_with_the_derived_ids_from_creation_to_end(
    spans: InMemorySpanExporter,
) -> None:
    run_id = uuid.uuid4().hex
    inside = trace.SpanContext(int(run_id, 16), 0xABC, is_remote=False, trace_flags=trace.TraceFlags(1))

    # The last step's worker records it from inside that step's span: the root must not hang under it.
    with trace.use_span(trace.NonRecordingSpan(inside)):
        tracing.run_ended(run_id, _ended(run_id))

    root = _by_name(spans)["run wf"]
    assert root.context is not None
    assert (root.context.trace_id, root.context.span_id) == (int(run_id, 16), tracing.run_root(run_id).span_id)
    assert root.parent is None
    assert (root.start_time, root.end_time) == (1_700_000_000_250_000_000, 1_700_000_012_500_000_000)
    assert root.attributes is not None
    assert root.attributes["orchestrator.status"] == "succeeded"
    assert root.status.status_code == StatusCode.UNSET


def test_a_failed_runs_root_is_an_error_and_a_resumed_runs_later_end_records_no_second_root(
    spans: InMemorySpanExporter,
) -> None:
    failed, resumed = uuid.uuid4().hex, uuid.uuid4().hex

    tracing.run_ended(failed, _ended(failed, status="failed"))
    tracing.run_ended(resumed, _ended(resumed, gen="2"))

    (root,) = spans.get_finished_spans()
    assert root.context is not None
    assert root.context.trace_id == int(failed, 16)
    assert root.status.status_code == StatusCode.ERROR


def test_with_tracing_off_an_attempt_costs_a_shared_null_context(tracing_off: None) -> None:
    run_id = uuid.uuid4().hex

    first = tracing.attempt_span(_info(run_id), telemetry.AttemptScope(_info(run_id)))
    second = tracing.attempt_span(_info(run_id, step="b"), telemetry.AttemptScope(_info(run_id)))
    with telemetry.step_attempt(_info(run_id)):
        assert tracing.dispatch_headers(run_id) == {}
        telemetry.llm_call(LLMCallRecord("wf", "m", 1, 1))

    assert first is second


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"ORCH_TRACE_FILE": "spans.jsonl"}, True),
    ],
    ids=["nothing", "none", "sdk-disabled", "endpoint", "otlp", "trace-file"],
)
def test_the_environment_turns_tracing_on_only_when_an_exporter_is_configured(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], on: bool
) -> None:
    for name in (
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "ORCH_TRACE_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    trace_provider.reset()
    try:
        assert (trace_provider.tracer() is not None) is on
    finally:
        trace_provider.reset()


def test_the_trace_file_gets_one_json_line_per_span_with_its_parent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    path = tmp_path / "spans.jsonl"
    monkeypatch.setenv("ORCH_TRACE_FILE", str(path))
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "tracing-test")
    trace_provider.reset()
    run_id = uuid.uuid4().hex
    try:
        with telemetry.step_attempt(_info(run_id)) as scope:
            scope.finish("succeeded")
    finally:
        trace_provider.reset()

    (line,) = path.read_text().splitlines()
    record = json.loads(line)
    assert (record["trace_id"], record["parent_span_id"]) == (run_id, f"{tracing.run_root(run_id).span_id:016x}")
    assert record["attributes"]["orchestrator.step"] == "draft"
    assert record["name"] == "wf.draft"


def test_the_engine_records_the_root_once_when_a_run_ends_or_is_cancelled_and_not_again_after_a_resume(
    spans: InMemorySpanExporter,
) -> None:
    runtime, publisher = make_runtime()
    definition = engine_workflow({"name": "a", "uses": "noop"}, {"name": "b", "uses": "noop", "depends_on": ["a"]})
    name = definition["name"]
    ended = start(runtime, publisher, definition)
    drive(runtime, publisher)
    cancelled = start(runtime, publisher, definition)
    publisher.sent.clear()
    stop_run(publisher, runtime.store, cancelled, RunStatus.CANCELLED, "by a test")
    resume_run(publisher, SETTINGS, runtime.store, ended, from_step="b")
    drive(runtime, publisher)

    roots = [s for s in spans.get_finished_spans() if s.name == f"run {name}"]
    assert sorted((s.context.trace_id, s.parent) for s in roots if s.context) == sorted(
        [(int(ended, 16), None), (int(cancelled, 16), None)]
    )
    statuses = {s.context.trace_id: (s.attributes or {})["orchestrator.status"] for s in roots if s.context}
    assert statuses == {int(ended, 16): "succeeded", int(cancelled, 16): "cancelled"}
    ids = {s.context.span_id for s in spans.get_finished_spans() if s.context}
    assert all(s.parent is None or s.parent.span_id in ids for s in spans.get_finished_spans()), "an orphan span"
