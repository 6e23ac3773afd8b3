"""Gauges of the whole cluster, read from Redis when Prometheus scrapes: queue depth and runs in flight.

::

    orchestrator_queue_depth{queue}          messages waiting in each step queue (Redis broker only)
    orchestrator_runs_in_flight{status}      pending, running and waiting runs among the newest ``run_scan`` runs
    orchestrator_cluster_scrape_ok           1 when Redis answered this scrape, else 0

They describe the whole cluster, so one place exports them: the API's ``/metrics`` (and a worker's endpoint only
with ``ORCH_METRICS_CLUSTER``, meant for one worker of a deployment without the API). Several API replicas each
export the same values: the dashboard takes ``max`` over instances, which is right however many there are.

A scrape costs three round trips: one pipeline of ``LLEN`` of each queue's priority lists
(:func:`orchestrator.engine.priorities.redis_queue_lists`), summed; the run index's newest ids; and one pipeline of
``HGET status`` per run, so at most ``run_scan`` (default 1000) small reads. Runs are counted among the newest
``run_scan`` only: an older run still in flight (one waiting days for an approval behind more than ``run_scan`` newer
runs) is not counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.engine.backlog import broker_for, queue_depths
from orchestrator.infra.redis_url import sync_client
from orchestrator.infra.settings import Settings
from orchestrator.state import keys
from orchestrator.state.redis.core import newest_run_ids

__all__ = ["DEFAULT_RUN_SCAN", "IN_FLIGHT_STATUSES", "ClusterCollector"]

log = logging.getLogger(__name__)

DEFAULT_RUN_SCAN = 1000
IN_FLIGHT_STATUSES = ("pending", "running", "waiting")

_SOCKET_TIMEOUT_S = 5.0


class ClusterCollector(Collector):
    """Reads queue depth and runs in flight from Redis on every collection.

    Args:
        store: The state store's Redis (run index and run hashes).
        broker: The broker's Redis, or ``None`` when the broker is not Redis (no queue depth then).
        queues: The step queues to measure.
        run_scan: How many of the newest runs to look at for runs in flight.
        shards: Buckets of the runs index (``ORCH_SHARDS``).
    """

    def __init__(
        self,
        store: redis.Redis,
        broker: redis.Redis | None,
        queues: Sequence[str],
        *,
        run_scan: int = DEFAULT_RUN_SCAN,
        shards: int = 1,
    ) -> None:
        self.store = store
        self.shards = shards
        self.broker = broker
        self.queues = tuple(dict.fromkeys(queues))
        self.run_scan = run_scan

    @classmethod
    def from_settings(cls, settings: Settings, *, run_scan: int = DEFAULT_RUN_SCAN) -> ClusterCollector:
        """A collector on the settings' Redis and broker, with short timeouts so a scrape never hangs long."""
        store = sync_client(
            settings.redis_url, socket_timeout=_SOCKET_TIMEOUT_S, socket_connect_timeout=_SOCKET_TIMEOUT_S
        )
        queues = (settings.llm_queue, settings.cpu_queue)
        return cls(store, broker_for(settings, store), queues, run_scan=run_scan, shards=settings.shards)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        """The families, without reading Redis (so registering the collector costs nothing)."""
        return self._families()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """The families with their values read now; Redis not answering yields ``scrape_ok 0`` and no values."""
        depth, runs, ok = self._families()
        try:
            if self.broker is not None:
                for queue, count in self._queue_depths().items():
                    depth.add_metric([queue], count)
            for status, count in self._runs_in_flight().items():
                runs.add_metric([status], count)
        except redis.RedisError as exc:
            log.warning("metrics: could not read queue depth and runs from Redis: %s", exc)
            ok.add_metric([], 0)
            return [ok]
        ok.add_metric([], 1)
        return [depth, runs, ok]

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "orchestrator_queue_depth", "Step messages waiting in each queue of the Redis broker.", labels=["queue"]
            ),
            GaugeMetricFamily(
                "orchestrator_runs_in_flight",
                f"Runs pending, running or waiting, among the newest {self.run_scan} runs.",
                labels=["status"],
            ),
            GaugeMetricFamily("orchestrator_cluster_scrape_ok", "1 when Redis answered this scrape's reads, else 0."),
        ]

    def _queue_depths(self) -> dict[str, int]:
        assert self.broker is not None
        return queue_depths(self.broker, self.queues)

    def _runs_in_flight(self) -> dict[str, int]:
        counts = dict.fromkeys(IN_FLIGHT_STATUSES, 0)
        run_ids = newest_run_ids(self.store, self.shards, self.run_scan)
        if not run_ids:
            return counts
        pipe = self.store.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hget(keys.run_key(_text(run_id)), "status")
        for status in pipe.execute():
            name = _text(status) if status is not None else ""
            if name in counts:
                counts[name] += 1
        return counts


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
