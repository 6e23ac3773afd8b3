"""The worker's Prometheus endpoint: one HTTP server in the main process, summing up every pool process.

Celery's prefork pool runs steps in child processes, each with its own memory. With ``ORCH_METRICS_PORT`` set, the
worker switches ``prometheus_client`` to its multiprocess mode before the pool forks: each pool process then writes
its counters and histograms to files in ``PROMETHEUS_MULTIPROC_DIR``, and the endpoint in the main process adds them
up with ``MultiProcessCollector``. The cluster gauges (queue depth, runs in flight) are the same for every process
that reads them, so they come from the API's ``/metrics``; a worker adds them only with ``ORCH_METRICS_CLUSTER``.
Counters of a pool process that exits stay in its files, so totals never go down while the worker lives. A
counter or histogram series appearing between two scrapes reads 0 in the first scrape that shows it
(:mod:`orchestrator.telemetry.exposition`), so ``increase()`` counts its first event.
Workflow, step and model labels are bounded per process by ``ORCH_METRICS_MAX_SERIES`` (see
:mod:`orchestrator.telemetry.metrics`): with a prefork pool the endpoint shows up to that many pairs per pool process.

``PROMETHEUS_MULTIPROC_DIR`` left unset gets a private temporary directory, removed when the worker stops. When it is
set, it must belong to this worker alone and be empty when the worker starts (``prometheus_client``'s rule): two
workers sharing one directory would each report the other's steps too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from orchestrator.infra.settings import Settings
from orchestrator.telemetry import metrics
from orchestrator.telemetry.cluster import ClusterCollector
from orchestrator.telemetry.exposition import serving

__all__ = ["MULTIPROC_DIR_ENV", "WorkerMetricsEndpoint"]

log = logging.getLogger(__name__)

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class WorkerMetricsEndpoint:
    """The endpoint of one worker, driven by the worker's signals (see :mod:`workers.app`).

    Args:
        settings: ``metrics_port`` (0: no endpoint, and nothing here does anything) and ``metrics_addr``.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.directory: str | None = None
        self._owned_directory: str | None = None
        self._server: WSGIServer | None = None

    @property
    def enabled(self) -> bool:
        """Whether the worker serves metrics."""
        return self.settings.metrics_port > 0

    @property
    def port(self) -> int | None:
        """The port being served, once :meth:`start` succeeded."""
        return int(self._server.server_port) if self._server is not None else None

    def prepare(self) -> None:
        """Set the label budget, then go multiprocess; call in the main process before forking (``worker_init``)."""
        # The budget applies with or without an endpoint: the in-process registry would grow just the same.
        metrics.configure(max_series=self.settings.metrics_max_series)
        if not self.enabled:
            return
        directory = os.environ.get(MULTIPROC_DIR_ENV)
        if directory:
            os.makedirs(directory, exist_ok=True)
        else:
            directory = self._owned_directory = tempfile.mkdtemp(prefix="orchestrator-metrics-")
            os.environ[MULTIPROC_DIR_ENV] = directory
        self.directory = directory
        # prometheus_client picks its value store once, when first imported, and that was before this variable was
        # set: pick again, so values made from now on (in the pool processes) write to the directory.
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        metrics.reset()

    def start(self) -> None:
        """Serve ``/metrics`` from a thread of the main process (``worker_ready``); a busy port is logged, not fatal."""
        if not self.enabled or self.directory is None or self._server is not None:
            return
        registry = self.registry()
        addr, port = self.settings.metrics_addr, self.settings.metrics_port
        try:
            self._server, _ = start_http_server(port, addr=addr, registry=registry)
        except OSError as exc:
            log.error("metrics: cannot serve on %s:%d: %s; this worker exports no metrics", addr, port, exc)
            return
        log.info("metrics: serving the metrics of every pool process on http://%s:%d/metrics", addr, port)

    def registry(self) -> CollectorRegistry:
        """What the endpoint serves: every pool process's metrics, plus the cluster gauges with ``metrics_cluster``.

        New series start at 0 in the scrapes (:class:`~orchestrator.telemetry.exposition.NewSeriesAtZero`).
        """
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        if self.settings.metrics_cluster:
            registry.register(ClusterCollector.from_settings(self.settings))
        return serving(registry)

    def after_fork(self) -> None:
        """In a pool process forked after :meth:`start`: close its copy of the listening socket."""
        # Otherwise a pool process outliving a killed main process would keep the port taken from its successor.
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.socket.close()
            self._server = None

    def process_exited(self, pid: int) -> None:
        """A pool process is exiting: drop its live gauges' files (its counters and histograms stay)."""
        if self.directory is not None:
            mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def stop(self) -> None:
        """Stop serving and remove the private directory (``worker_shutdown``)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._owned_directory is not None:
            shutil.rmtree(self._owned_directory, ignore_errors=True)
            self._owned_directory = None
