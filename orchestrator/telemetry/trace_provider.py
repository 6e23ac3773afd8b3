"""This process's OpenTelemetry tracer, built once from the standard environment (and again after a fork).

``OTEL_SDK_DISABLED=true`` turns tracing off. ``OTEL_TRACES_EXPORTER`` lists exporters: ``otlp`` (OTLP over HTTP,
batched on a background thread), ``console`` (JSON on stderr, never stdout, which belongs to the command's output),
``none``. When it is unset, ``otlp`` is used only if ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set: unlike the SDK's default, nothing configured means no provider at all,
so a step pays nothing for tracing. The SDK itself reads ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*`` and ``OTEL_EXPORTER_OTLP_*`` (endpoint, headers, timeout, compression).

At exit (and when a worker's pool process stops) what is still batched is flushed within ``ORCH_TRACE_FLUSH_S``
seconds (default 1, at most 30): an unreachable collector costs a command that long at most, and one log line
(see :mod:`.otlp_export`).

``ORCH_TRACE_FILE=/path`` (ours, for tests and debugging) also appends every finished span to that file as one JSON
line, synchronously, so the spans of many processes can be read back together.

The provider is the orchestrator's own, not OpenTelemetry's global one, so an application embedding the client keeps
its own setup; the span context is shared all the same, so other instrumentation inside a step nests under it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

from orchestrator.telemetry.otlp_export import QuietOTLPExporter

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_SERVICE_NAME", "SpanFileExporter", "configure", "forced_ids", "reset", "shutdown", "tracer"]

#: Used when neither ``OTEL_SERVICE_NAME`` nor ``OTEL_RESOURCE_ATTRIBUTES`` names the service.
DEFAULT_SERVICE_NAME = "llm-orchestrator"
#: Seconds the last flush may take at exit, unless ``ORCH_TRACE_FLUSH_S`` says otherwise (at most ``MAX_FLUSH_S``).
DEFAULT_FLUSH_S = 1.0
MAX_FLUSH_S = 30.0

_SCOPE = "orchestrator"
# Ids the next new trace and span must take: set only while starting a run's root span.
_FORCED_IDS: ContextVar[tuple[int, int] | None] = ContextVar("orchestrator_forced_ids", default=None)


def tracer() -> trace.Tracer | None:
    """This process's tracer, or ``None`` when tracing is off (built from the environment on first call)."""
    if not _setup.done:
        with _setup.lock:
            if not _setup.done:
                try:
                    _install(_processors_from_env(os.environ), _flush_budget(os.environ))
                except Exception:
                    log.warning("tracing: could not be set up from the environment; it stays off", exc_info=True)
                    _setup.done = True
    return _setup.tracer


def configure(*processors: SpanProcessor) -> None:
    """Trace to these span processors from now on, instead of what the environment says; none turns tracing off.

    For tests (an ``InMemorySpanExporter``) and for applications wiring their own exporters.
    """
    with _setup.lock:
        _drop()
        _install(list(processors))


def reset() -> None:
    """Flush and forget the tracer: the next span reads the environment again."""
    with _setup.lock:
        _drop()


def shutdown(**_: object) -> None:
    """Flush and close this process's exporters within ``ORCH_TRACE_FLUSH_S``.

    Called at exit, and by a worker's pool process as it stops (those leave through ``os._exit``).
    """
    _close(_setup.processors, _setup.flush_s)


@contextlib.contextmanager
def forced_ids(trace_id: int, span_id: int) -> Iterator[None]:
    """Make a root span started inside take these ids (a run's root span, whose ids derive from the run)."""
    token = _FORCED_IDS.set((trace_id, span_id))
    try:
        yield
    finally:
        _FORCED_IDS.reset(token)


class SpanFileExporter(SpanExporter):
    """Appends each finished span to a file as one JSON line (ids in hex, attributes, pid), for tests and debugging.

    Each batch is one ``O_APPEND`` write, so processes can share the file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Append the spans."""
        lines = "".join(json.dumps(_span_record(s), default=str) + "\n" for s in spans)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, lines.encode())
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS


def _span_record(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    return {
        "trace_id": f"{ctx.trace_id:032x}" if ctx else None,
        "span_id": f"{ctx.span_id:016x}" if ctx else None,
        "parent_span_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "status": span.status.status_code.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "attributes": dict(span.attributes or {}),
        "pid": os.getpid(),
    }


class _RunIds(RandomIdGenerator):
    """Random ids, except inside :func:`forced_ids`."""

    def generate_span_id(self) -> int:
        forced = _FORCED_IDS.get()
        return forced[1] if forced else super().generate_span_id()

    def generate_trace_id(self) -> int:
        forced = _FORCED_IDS.get()
        return forced[0] if forced else super().generate_trace_id()


@dataclass
class _Setup:
    done: bool = False
    provider: TracerProvider | None = None
    tracer: trace.Tracer | None = None
    processors: list[SpanProcessor] = field(default_factory=list)
    flush_s: float = DEFAULT_FLUSH_S
    lock: threading.Lock = field(default_factory=threading.Lock)


_setup = _Setup()


def _install(processors: list[SpanProcessor], flush_s: float = DEFAULT_FLUSH_S) -> None:
    _setup.done = True
    if not processors:
        return
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    # The SDK's own exit hook would flush without a deadline: ours bounds it (see shutdown).
    provider = TracerProvider(resource=resource, id_generator=_RunIds(), shutdown_on_exit=False)
    for processor in processors:
        provider.add_span_processor(processor)
    _setup.provider, _setup.processors, _setup.flush_s = provider, processors, flush_s
    _setup.tracer = provider.get_tracer(_SCOPE)
    # Prefork pool processes leave through os._exit, skipping atexit: flush on Celery's signal too.
    from celery.signals import worker_process_shutdown

    worker_process_shutdown.connect(shutdown, weak=False, dispatch_uid="orchestrator.tracing.shutdown")


def _close(processors: list[SpanProcessor], budget_s: float) -> None:
    """Shut the processors down, the batching ones' exporters told to be done within ``budget_s``."""
    deadline = time.monotonic() + budget_s
    for processor in processors:
        exporter = getattr(processor, "span_exporter", None)
        if isinstance(exporter, QuietOTLPExporter):
            exporter.finish_within(deadline - time.monotonic())
    for processor in processors:
        try:
            processor.shutdown()
        except Exception:
            log.warning("tracing: a span processor failed to shut down", exc_info=True)
    processors.clear()


def _drop() -> None:
    _close(_setup.processors, _setup.flush_s)
    _setup.done, _setup.provider, _setup.tracer, _setup.processors = False, None, None, []


def _forget_after_fork() -> None:
    # The parent's export thread does not exist in a forked child, and its lock may be held: start afresh.
    _setup.done, _setup.provider, _setup.tracer, _setup.processors = False, None, None, []
    _setup.lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(shutdown)


def _processors_from_env(env: Mapping[str, str]) -> list[SpanProcessor]:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names and (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        names = ["otlp"]
    processors: list[SpanProcessor] = []
    for name in names:
        if name == "otlp":
            processors.append(BatchSpanProcessor(_otlp_exporter(env)))
        elif name == "console":
            # stdout is the command's own output (``submit --json`` must stay JSON).
            processors.append(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
        elif name != "none":
            log.warning("tracing: unknown OTEL_TRACES_EXPORTER %r ignored (known: otlp, console, none)", name)
    if env.get("ORCH_TRACE_FILE"):
        processors.append(SimpleSpanProcessor(SpanFileExporter(env["ORCH_TRACE_FILE"])))
    return processors


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter:
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    if protocol and protocol != "http/protobuf":
        log.warning("tracing: OTLP protocol %r is not installed; exporting with http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return QuietOTLPExporter(lambda timeout: OTLPSpanExporter(timeout=timeout), _otlp_endpoint(env))


def _otlp_endpoint(env: Mapping[str, str]) -> str:
    """Where the OTLP exporter sends spans, as it works it out from the same variables."""
    if traces := env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return traces
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4318"
    return base.rstrip("/") + "/v1/traces"


def _flush_budget(env: Mapping[str, str]) -> float:
    """``ORCH_TRACE_FLUSH_S``: seconds, from 0 to ``MAX_FLUSH_S``; anything else is reported and the default used."""
    raw = env.get("ORCH_TRACE_FLUSH_S", "").strip()
    if not raw:
        return DEFAULT_FLUSH_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_FLUSH_S:
        log.warning(
            "tracing: ORCH_TRACE_FLUSH_S=%r is not a number of seconds from 0 to %g; using %g",
            raw[:40],
            MAX_FLUSH_S,
            DEFAULT_FLUSH_S,
        )
        return DEFAULT_FLUSH_S
    return value
