"""What an endpoint shows Prometheus: every counter and histogram series starts at 0 in the scrapes.

Labelled series exist from their first observation, so the first scrape that sees a series already sees it counted
(1 failure, $0.0116 of cost), and Prometheus takes a series' first sample as its baseline: ``increase()`` and
``rate()`` then lose that first event, which for a one-off failure, or the first run of a new workflow, is all of
it. Prometheus 2.42 reads no ``_created`` timestamps, and pre-creating every series by hand cannot know the error
types and models still to come.

:class:`NewSeriesAtZero` wraps what an endpoint serves and, after its first scrape, reports each counter or histogram
series it has not shown before as 0 once; the next scrape shows its value. Prometheus then sees 0 → value and counts
every event, at the cost of showing a new series' first events one scrape interval late. The first scrape of the
endpoint shows the values as they are (nothing to compare them with: a restarted worker's counters are a reset, which
Prometheus handles). The endpoint remembers one scrape history, so with two Prometheus servers scraping it (an HA
pair), the one that scrapes second after a series appears sees it as today's Prometheus would.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = ["NewSeriesAtZero", "serving"]

# Families whose samples only ever grow from 0 (a gauge's value is what it is; a `_created` sample is a time).
_GROWING = frozenset({"counter", "histogram", "summary"})


class NewSeriesAtZero(Collector):
    """A view of ``source`` in which a counter or histogram series appearing after the first collection reads 0 once.

    Args:
        source: The registry (or any collector) whose metrics are served.
    """

    def __init__(self, source: Collector) -> None:
        self.source = source
        self._shown: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        self._first = True
        self._lock = threading.Lock()

    def collect(self) -> list[Metric]:
        """The source's metrics, with the series never shown before at 0 (except on the first collection)."""
        families = list(self.source.collect())
        with self._lock:
            first, self._first = self._first, False
            return [self._view(family, first) for family in families]

    def _view(self, family: Metric, first: bool) -> Metric:
        if family.type not in _GROWING:
            return family
        view = Metric(family.name, family.documentation, family.type, family.unit)
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            new = key not in self._shown and not sample.name.endswith("_created")
            self._shown.add(key)
            view.samples.append(sample._replace(value=0.0) if new and not first else sample)
        return view


def serving(source: Collector) -> CollectorRegistry:
    """A registry to serve ``source`` from, through :class:`NewSeriesAtZero`."""
    registry = CollectorRegistry()
    registry.register(NewSeriesAtZero(source))
    return registry
