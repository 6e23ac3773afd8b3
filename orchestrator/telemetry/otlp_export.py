"""OTLP/HTTP export that stays out of the way: quiet when the collector is away, bounded when the process exits.

The OpenTelemetry exporter retries an unreachable collector with backoff (1 s, 2 s, 4 s …) and logs a warning per
try. Behind a batch processor that happens on a background thread, except at exit, where the last flush would hold
a CLI call for seconds. :class:`QuietOTLPExporter` wraps it so that:

* its log records are swallowed, and one line is logged instead when exports start failing (and one when they work
  again), with the endpoint and the reason;
* :meth:`QuietOTLPExporter.finish_within` gives the final flush a deadline: the exporter still retrying is shut (its
  backoff ends at once) and the rest goes through an exporter whose whole export, retries included, fits the budget.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger(__name__)

__all__ = ["QuietOTLPExporter"]

# Where the OTLP/HTTP exporter logs, across the versions we accept.
_EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.proto.common._internal",
    "opentelemetry.exporter.otlp.common.http",
)
_REASON_CHARS = 200


class _Muffler(logging.Filter):
    """Drops the exporter's records logged inside :meth:`QuietOTLPExporter.export`, keeping the first (the cause)."""

    def __init__(self) -> None:
        super().__init__("orchestrator.otlp")
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(self.local, "active", False):
            return True
        if not self.local.last:
            self.local.last = record.getMessage()
        return False


_MUFFLER = _Muffler()
for _name in _EXPORTER_LOGGERS:
    logging.getLogger(_name).addFilter(_MUFFLER)


class QuietOTLPExporter(SpanExporter):
    """An OTLP/HTTP span exporter that reports an unreachable collector in one line and can be told to hurry.

    Args:
        build: Makes the underlying exporter; called with ``timeout=None`` (the environment's, default 10 s) and
            again, at the final flush, with the seconds left.
        endpoint: Where spans go, for the log line (credentials are left out).
    """

    def __init__(self, build: Callable[[float | None], SpanExporter], endpoint: str) -> None:
        self._build = build
        self._exporter = build(None)
        self._endpoint = _without_credentials(endpoint)
        self._failing = False
        self._deadline: float | None = None
        self._closed = False
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Send the spans; on failure log one line (the first of an outage only) and drop them."""
        exporter, deadline = self._exporter, self._deadline
        if deadline is not None and time.monotonic() >= deadline:
            return SpanExportResult.FAILURE
        _MUFFLER.local.active, _MUFFLER.local.last = True, ""
        try:
            result = exporter.export(spans)
        except Exception as exc:
            _MUFFLER.local.last = f"{type(exc).__name__}: {exc}"
            result = SpanExportResult.FAILURE
        finally:
            _MUFFLER.local.active = False
        self._report(result, _MUFFLER.local.last)
        return result

    def finish_within(self, seconds: float) -> None:
        """Bound what is left to export: from now on every export ends within ``seconds``, retries included."""
        with self._lock:
            if self._closed:
                return
            self._deadline = time.monotonic() + seconds
            stale, self._exporter = self._exporter, self._build(max(seconds, 0.001))
        # Ends a backoff the background thread may be sleeping in; that batch is dropped.
        stale.shutdown()

    def shutdown(self) -> None:
        """Close the underlying exporter (once)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered here."""
        return True

    def _report(self, result: SpanExportResult, reason: str) -> None:
        if result == SpanExportResult.SUCCESS:
            if self._failing:
                self._failing = False
                log.info("tracing: spans reach %s again", self._endpoint)
            return
        if not self._failing:
            self._failing = True
            detail = " ".join(reason.split())[:_REASON_CHARS] or "no reason given"
            log.warning(
                "tracing: could not send spans to %s (%s); dropping them until it answers", self._endpoint, detail
            )


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
