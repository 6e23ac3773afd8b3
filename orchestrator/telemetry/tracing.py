"""OpenTelemetry: one trace per run, a span per step attempt, joined across worker processes.

A run's trace id *is* its id (``int(run_id, 16)``), and its root span id is derived from it, so any process can join
the run's trace without storing anything. Context travels in the Celery message as a W3C ``traceparent`` header:

* a dispatch made inside an attempt span of the same run (a finishing step releasing its children) sends that span,
  so children hang under the step that released them; a retry re-sends the headers of its first delivery;
* a submission made by a producer that traces sends its ``submit WORKFLOW`` span (:func:`submit_span`), itself a
  child of the run's root;
* any other dispatch (an untraced producer, the sweeper, resume, approvals) sends nothing, and the worker falls back
  to the run's root span context.

The root span itself, ``run WORKFLOW``, is recorded by the engine when the run first ends (:func:`run_ended`), by
whichever process ends it, from the run's creation to its end: it exists in the backend whoever submitted the run,
and lasts as long as the run. Until then a backend shows the steps under a parent it has not received yet.

Spans carry the GenAI semantic-convention attributes (``gen_ai.*``) and the orchestrator's (``orchestrator.*``);
each LLM call is also a ``chat MODEL`` child span of its attempt.

The tracer comes from :mod:`.trace_provider`, configured by the standard OpenTelemetry environment variables;
when tracing is off, :func:`attempt_span` is a shared null context.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator, Mapping
from contextvars import Token
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from orchestrator.telemetry import trace_provider

if TYPE_CHECKING:
    from orchestrator.telemetry.records import AttemptInfo, AttemptScope, LLMCallRecord

log = logging.getLogger(__name__)

__all__ = [
    "attempt_span",
    "dispatch_headers",
    "enabled",
    "parent_context",
    "record_llm_call",
    "run_ended",
    "run_root",
    "run_trace_id",
    "submit_span",
]

#: The GenAI ``gen_ai.system`` of every LLM call: the offline provider stands in for Anthropic's API.
GEN_AI_SYSTEM = "anthropic"
TRACEPARENT = "traceparent"

_PROPAGATOR = TraceContextTextMapPropagator()
_LLM_TOTALS = otel_context.create_key("orchestrator.llm_totals")
_NOTHING = contextlib.nullcontext()
_FAILED_RUN = frozenset({"failed", "timed_out"})


# --- ids and parents ------------------------------------------------------------------------------------------------


def run_trace_id(run_id: str) -> int:
    """The run's trace id: its 32-hex id read as a number (hashed, for an id of another shape)."""
    if len(run_id) == 32:
        with contextlib.suppress(ValueError):
            value = int(run_id, 16)
            if value:
                return value
    return int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:16], "big") or 1


def run_root(run_id: str) -> SpanContext:
    """The run's root span context: the parent of every attempt that no traced step released."""
    span_id = int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:8], "big") or 1
    return SpanContext(run_trace_id(run_id), span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))


def parent_context(run_id: str, headers: Mapping[str, Any]) -> SpanContext:
    """The parent of an attempt: the ``traceparent`` its message carries when it is of this run, else the root."""
    if headers.get(TRACEPARENT):
        sent = trace.get_current_span(_PROPAGATOR.extract(headers)).get_span_context()
        if sent.is_valid and sent.trace_id == run_trace_id(run_id):
            return sent
    return run_root(run_id)


def dispatch_headers(run_id: str) -> dict[str, str]:
    """Message headers for a step of ``run_id`` dispatched now: the current span when it belongs to the run.

    Outside such a span the worker derives the run's root by itself, so nothing needs sending.
    """
    current = trace.get_current_span().get_span_context()
    if not current.is_valid or current.trace_id != run_trace_id(run_id):
        return {}
    return {TRACEPARENT: f"00-{current.trace_id:032x}-{current.span_id:016x}-{int(current.trace_flags):02x}"}


# --- spans ----------------------------------------------------------------------------------------------------------


def attempt_span(info: AttemptInfo, scope: AttemptScope) -> contextlib.AbstractContextManager[None]:
    """A span for the attempt, current while it runs, child of whatever dispatched it, in the run's trace.

    Never raises into the step: a tracing failure only logs. When tracing is off this is a shared null context.
    """
    tracer = trace_provider.tracer()
    if tracer is None:
        return _NOTHING
    return _AttemptSpan(tracer, info, scope)


def record_llm_call(record: LLMCallRecord) -> None:
    """Add the call's tokens and cost to the current attempt's span, and record it as a ``chat MODEL`` child span."""
    totals = otel_context.get_value(_LLM_TOTALS)
    tracer = trace_provider.tracer()
    if not isinstance(totals, _LLMTotals) or tracer is None:
        return
    totals.add(record)
    end = time.time_ns()
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        **_gen_ai(record.model, record.input_tokens, record.output_tokens, record.response_model),
        "orchestrator.cached": record.cached,
    }
    if record.cost_usd is not None:
        attributes["orchestrator.cost_usd"] = record.cost_usd
    if record.error_kind:
        attributes["error.type"] = record.error_kind
    span = tracer.start_span(
        f"chat {record.model}",
        kind=SpanKind.CLIENT,
        attributes=attributes,
        start_time=end - int(record.duration_s * 1e9),
    )
    if record.error_kind:
        span.set_status(Status(StatusCode.ERROR, record.error_kind))
    span.end(end_time=end)


def enabled() -> bool:
    """Whether this process traces (the environment, or :func:`.trace_provider.configure`, turned it on)."""
    return trace_provider.tracer() is not None


@contextlib.contextmanager
def submit_span(run_id: str, workflow: str) -> Iterator[None]:
    """Record the submission as ``submit WORKFLOW``, a producer span under the run's root, around its first dispatch.

    Dispatches made inside carry it, so the first steps hang under it. When the submission happens inside another
    trace (a web request …) that span is linked, never the parent, so a run stays one trace. A no-op when tracing is
    off; never raises on its own account.
    """
    tracer = trace_provider.tracer()
    if tracer is None:
        yield
        return
    try:
        links = []
        caller = trace.get_current_span().get_span_context()
        if caller.is_valid:
            links.append(trace.Link(caller))
        span: trace.Span | None = tracer.start_span(
            f"submit {workflow}",
            context=trace.set_span_in_context(trace.NonRecordingSpan(run_root(run_id)), otel_context.Context()),
            kind=SpanKind.PRODUCER,
            links=links,
            attributes={"orchestrator.run_id": run_id, "orchestrator.workflow": workflow},
        )
    except Exception:
        log.warning("tracing: could not start the submit span of run %s", run_id, exc_info=True)
        span = None
    if span is None:
        yield
        return
    with trace.use_span(span, end_on_exit=True):
        yield


def run_ended(run_id: str, fields: Mapping[str, str]) -> None:
    """Record the run's root span ``run WORKFLOW`` (with the id :func:`run_root` derives), from creation to end.

    ``fields`` are the run's stored fields once it has ended (``workflow``, ``status``, ``gen``, ``created_at``,
    ``finished_at``, epoch seconds). Only the first generation's end records it: a resumed run's later steps hang
    under the same root, which a backend must receive once. A no-op when tracing is off; never raises.
    """
    tracer = trace_provider.tracer()
    if tracer is None or fields.get("gen", "1") != "1":
        return
    try:
        status = fields.get("status", "")
        workflow = fields.get("workflow", "")
        start = _epoch_ns(fields["created_at"])
        end = max(start, _epoch_ns(fields["finished_at"]) if fields.get("finished_at") else time.time_ns())
        attributes = {"orchestrator.run_id": run_id, "orchestrator.workflow": workflow, "orchestrator.status": status}
        root = run_root(run_id)
        with trace_provider.forced_ids(root.trace_id, root.span_id):
            span = tracer.start_span(
                f"run {workflow}", context=otel_context.Context(), attributes=attributes, start_time=start
            )
        if status in _FAILED_RUN:
            span.set_status(Status(StatusCode.ERROR, fields.get("first_failure") or status))
        span.end(end_time=end)
    except Exception:
        log.warning("tracing: could not record the root span of run %s", run_id, exc_info=True)


class _LLMTotals:
    """What one attempt's LLM calls add up to."""

    __slots__ = ("calls", "cost_usd", "input_tokens", "model", "output_tokens")

    def __init__(self) -> None:
        self.calls = self.input_tokens = self.output_tokens = 0
        self.cost_usd = 0.0
        self.model = ""

    def add(self, record: LLMCallRecord) -> None:
        self.calls += 1
        self.input_tokens += record.input_tokens
        self.output_tokens += record.output_tokens
        self.cost_usd += record.cost_usd or 0.0
        self.model = record.model


class _AttemptSpan:
    """The attempt's span, as a context manager that swallows its own failures and never the step's."""

    __slots__ = ("_info", "_scope", "_span", "_token", "_totals", "_tracer")

    def __init__(self, tracer: trace.Tracer, info: AttemptInfo, scope: AttemptScope) -> None:
        self._tracer = tracer
        self._info = info
        self._scope = scope
        self._span: trace.Span | None = None
        self._token: Token[otel_context.Context] | None = None
        self._totals = _LLMTotals()

    def __enter__(self) -> None:
        info = self._info
        try:
            parent = trace.set_span_in_context(trace.NonRecordingSpan(parent_context(info.run_id, info.headers)))
            attributes: dict[str, Any] = {
                "orchestrator.run_id": info.run_id,
                "orchestrator.workflow": info.workflow,
                "orchestrator.step": info.step,
                "orchestrator.kind": info.kind,
                "orchestrator.attempt": info.attempt,
                "orchestrator.task_id": info.task_id,
                "orchestrator.queue": info.queue,
            }
            if info.queue_wait_s is not None:
                attributes["orchestrator.queue_wait_s"] = info.queue_wait_s
            span = self._tracer.start_span(
                f"{info.workflow}.{info.step}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
            )
            current = otel_context.set_value(_LLM_TOTALS, self._totals, trace.set_span_in_context(span))
            self._token = otel_context.attach(current)
            self._span = span
        except Exception:
            log.warning("tracing: could not start the span of %s.%s", info.workflow, info.step, exc_info=True)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        span, self._span = self._span, None
        if span is None:
            return
        try:
            self._finish(span, exc)
        except Exception:
            log.warning("tracing: could not finish the span of %s", self._info.step, exc_info=True)
        finally:
            if self._token is not None:
                otel_context.detach(self._token)
                self._token = None

    def _finish(self, span: trace.Span, exc: BaseException | None) -> None:
        scope, totals = self._scope, self._totals
        span.set_attribute("orchestrator.outcome", scope.outcome)
        span.set_attribute("orchestrator.cost_usd", scope.cost_usd or totals.cost_usd)
        if totals.calls:
            span.set_attributes(_gen_ai(totals.model, totals.input_tokens, totals.output_tokens))
            span.set_attribute("orchestrator.llm_calls", totals.calls)
        if scope.error_kind:
            span.set_attribute("orchestrator.error_kind", scope.error_kind)
            span.set_attribute("error.type", scope.error_kind)
        if scope.outcome in {"failed", "retry"}:
            span.set_status(Status(StatusCode.ERROR, scope.error_kind))
        elif exc is not None and scope.outcome == "unknown":
            # Escaped without the task saying how the attempt ended: a bug or a worker being torn down.
            span.record_exception(exc)
            span.set_attribute("error.type", type(exc).__qualname__)
            span.set_status(Status(StatusCode.ERROR, type(exc).__qualname__))
        span.end()


def _epoch_ns(seconds: str) -> int:
    # Through Decimal: a float has no nanoseconds left at today's epoch.
    return int(Decimal(seconds) * 1_000_000_000)


def _gen_ai(model: str, input_tokens: int, output_tokens: int, response_model: str | None = None) -> dict[str, Any]:
    return {
        "gen_ai.system": GEN_AI_SYSTEM,
        "gen_ai.request.model": model,
        "gen_ai.response.model": response_model or model,
        "gen_ai.usage.input_tokens": input_tokens,
        "gen_ai.usage.output_tokens": output_tokens,
    }
