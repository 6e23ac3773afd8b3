"""The API's own Prometheus metrics, in a registry per app (``GET /metrics`` exposes it).

Requests are counted by route template, never by raw path, so run ids do not explode the label space; a method
outside the standard ones is counted as ``OTHER``, since a client may send any token there. The same
registry also carries the cluster gauges (queue depth, runs in flight; :mod:`orchestrator.telemetry.cluster`), read
from Redis at scrape time; the API is where they come from. Step and LLM metrics come from the workers' own endpoints
(``ORCH_METRICS_PORT``). As there, a counter series new since the last scrape reads 0 once
(:mod:`orchestrator.telemetry.exposition`), so the first 500 of a route is counted by ``increase()``.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.infra.settings import Settings
from orchestrator.telemetry.cluster import ClusterCollector
from orchestrator.telemetry.exposition import serving

# RFC 9110's methods plus PATCH; HTTP servers pass any other token through, and each would be a new series.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


class ApiMetrics:
    """Counters and gauges of one API app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "orchestrator_api_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.stream_clients = Gauge(
            "orchestrator_api_stream_clients",
            "Event stream clients connected now, by kind (sse, ws).",
            ["kind"],
            registry=self.registry,
        )
        self.stream_drops = Counter(
            "orchestrator_api_stream_clients_dropped",
            "Event stream clients disconnected because they fell behind, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.hubs = Gauge(
            "orchestrator_api_event_hubs",
            "Runs with a live Redis event reader shared by their stream clients.",
            registry=self.registry,
        )
        for kind in ("sse", "ws"):
            self.stream_clients.labels(kind)
            self.stream_drops.labels(kind)
        self._cluster: ClusterCollector | None = None
        self._served = serving(self.registry)
        self._cluster_lock = threading.Lock()

    def watch_cluster(self, settings: Settings) -> None:
        """Add the cluster gauges read from the Redis of ``settings`` (once; later calls do nothing)."""
        with self._cluster_lock:
            if self._cluster is None:
                self._cluster = ClusterCollector.from_settings(settings)
                self.registry.register(self._cluster)

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric (the cluster gauges read Redis now)."""
        return generate_latest(self._served)


class RequestMetricsMiddleware:
    """Counts every HTTP request once it is answered (a stream, once it ends)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            self.metrics.requests.labels(method, route, str(status)).inc()
