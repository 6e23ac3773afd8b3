"""Prometheus metrics of steps and LLM calls, safe under Celery's prefork pool.

Every family is labelled by workflow, step, model, queue and error type, never by run id, so the number of series
stays bounded by what is deployed rather than by traffic. Names and labels::

    orchestrator_step_attempts_total{workflow, step, kind, outcome, error_type}   counter
    orchestrator_step_duration_seconds{workflow, step, kind, outcome}            histogram
    orchestrator_step_queue_wait_seconds{workflow, step, queue}                  histogram
    orchestrator_step_deferrals_total{workflow, model, reason}                   counter
    orchestrator_llm_calls_total{workflow, model, outcome, error_type}           counter (provider calls)
    orchestrator_llm_call_duration_seconds{workflow, model}                      histogram
    orchestrator_llm_tokens_total{workflow, model, token_type}                   counter (input, output)
    orchestrator_llm_cost_usd_total{workflow, model}                             counter
    orchestrator_llm_reply_cache_hits_total{workflow, model}                     counter

Workflow, step and model names come from submitted definitions, so each process admits at most
``ORCH_METRICS_MAX_SERIES`` (default 2,000) distinct ``(workflow, step)`` pairs, and as many ``(workflow, model)``
pairs, in the order it first sees them; every later pair is reported as ``workflow="_other"`` with
``step="_other"`` (or ``model="_other"``), so totals stay right while the series stop growing. The budget is per
process (each prefork pool process has its own), and the other labels take values the deployment fixes (step kinds,
outcomes, error types, the queues a worker serves).

``outcome`` of a step attempt is ``succeeded``, ``failed``, ``retry``, ``deferred``, ``skipped``, ``waiting``,
``mapped`` (a map step expanded into its items), ``stale`` or ``unknown`` (an exception escaped the task); retries
are the ``retry`` outcome. The queue wait runs from
the moment the step was queued to the claim, both on Redis's clock; for a retry or a deferral it includes the
countdown the step was given. Tokens and cost count what the provider billed; replies served from the reply cache
count only as cache hits.

The families are built lazily, on the first observation in each process. A worker that serves metrics switches
``prometheus_client`` to its multiprocess mode before it forks (:mod:`workers.metrics`), so each pool process then
writes its values to files that the endpoint in the main process sums up. Without that (a test, a client process)
they live in :func:`registry`, an ordinary in-process registry.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase

from orchestrator.infra.settings import Settings

if TYPE_CHECKING:
    from orchestrator.telemetry.records import AttemptScope, LLMCallRecord

__all__ = [
    "DEFAULT_MAX_SERIES",
    "DURATION_BUCKETS",
    "OVERFLOW_LABEL",
    "StepMetrics",
    "configure",
    "record_attempt",
    "record_deferral",
    "record_llm_call",
    "registry",
    "reset",
]

# From a cache hit or a tiny Python step (10 ms) to a long generation with retries (10 min).
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# Label values come from workflow definitions and error kinds; a cap keeps a pathological name from bloating Prometheus.
_MAX_LABEL = 100

# Distinct (workflow, step) and (workflow, model) pairs a process reports by name until configure() says otherwise:
# the default of ORCH_METRICS_MAX_SERIES.
DEFAULT_MAX_SERIES: Final[int] = Settings.metrics_max_series

# What the pairs past the budget are reported as; a leading underscore, which workflow names cannot have.
OVERFLOW_LABEL = "_other"


class _PairBudget:
    """Admits the first ``limit`` distinct label pairs it is asked about; any other pair becomes the overflow pair."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._admitted: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def admit(self, pair: tuple[str, str]) -> tuple[str, str]:
        if pair in self._admitted:
            return pair
        with self._lock:
            if len(self._admitted) < self.limit:
                self._admitted.add(pair)
                return pair
        return OVERFLOW_LABEL, OVERFLOW_LABEL


class StepMetrics:
    """The metric families of steps and LLM calls.

    Args:
        registry: Where to register them; ``None`` registers nowhere (multiprocess mode, where values go to files
            that ``MultiProcessCollector`` reads).
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.step_attempts = Counter(
            "orchestrator_step_attempts",
            "Step attempts ended, by outcome (succeeded, failed, retry, deferred, skipped, waiting, stale, unknown) "
            "and error type.",
            ["workflow", "step", "kind", "outcome", "error_type"],
            registry=registry,
        )
        self.step_duration = Histogram(
            "orchestrator_step_duration_seconds",
            "Wall time of a step attempt in the worker, from claim to recorded outcome.",
            ["workflow", "step", "kind", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "orchestrator_step_queue_wait_seconds",
            "Time from a step being queued to an attempt starting (Redis clock; includes retry and deferral "
            "countdowns).",
            ["workflow", "step", "queue"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.deferrals = Counter(
            "orchestrator_step_deferrals",
            "Steps put back in the queue to wait for a shared rate limit or a provider's cool-down, by model and "
            "reason.",
            ["workflow", "model", "reason"],
            registry=registry,
        )
        self.llm_calls = Counter(
            "orchestrator_llm_calls",
            "Calls made to the LLM provider, by outcome (ok, error) and error type.",
            ["workflow", "model", "outcome", "error_type"],
            registry=registry,
        )
        self.llm_duration = Histogram(
            "orchestrator_llm_call_duration_seconds",
            "Wall time of a call to the LLM provider.",
            ["workflow", "model"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.llm_tokens = Counter(
            "orchestrator_llm_tokens",
            "Tokens billed by the LLM provider, by token type (input, output).",
            ["workflow", "model", "token_type"],
            registry=registry,
        )
        self.llm_cost = Counter(
            "orchestrator_llm_cost_usd",
            "What LLM calls cost in US dollars (models without a price add nothing).",
            ["workflow", "model"],
            registry=registry,
        )
        self.cache_hits = Counter(
            "orchestrator_llm_reply_cache_hits",
            "LLM requests answered from the reply cache instead of the provider.",
            ["workflow", "model"],
            registry=registry,
        )
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}

    def child(self, family: MetricWrapperBase, *values: str) -> Any:
        """``family.labels(*values)``, remembered: ``prometheus_client`` checks the values and takes a lock on every
        ``labels()`` call, about 1% of the ``llm`` worker's CPU at eight calls a step. As many children are kept as
        the family itself keeps (the label budget bounds them)."""
        key = (family, values)
        found = self._children.get(key)
        if found is None:
            found = self._children.setdefault(key, family.labels(*values))
        return found


class _Current:
    """This process's families and the registry they are in, rebuilt lazily after :func:`reset`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.metrics: StepMetrics | None = None
        self.registry = CollectorRegistry()
        self.max_series = DEFAULT_MAX_SERIES
        self.steps = _PairBudget(self.max_series)
        self.models = _PairBudget(self.max_series)


_current = _Current()


def _metrics() -> StepMetrics:
    if _current.metrics is None:
        with _current.lock:
            if _current.metrics is None:
                # In multiprocess mode the values live in files; registering them too would count them twice.
                multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
                _current.metrics = StepMetrics(None if multiprocess else _current.registry)
    return _current.metrics


def registry() -> CollectorRegistry:
    """The in-process registry holding the families when multiprocess mode is off."""
    return _current.registry


def reset() -> None:
    """Forget the families and the admitted label pairs: the next observation starts over (mode switches, tests)."""
    with _current.lock:
        _current.metrics = None
        _current.registry = CollectorRegistry()
        _current.steps = _PairBudget(_current.max_series)
        _current.models = _PairBudget(_current.max_series)


def configure(*, max_series: int) -> None:
    """Set this process's label budget (``Settings.metrics_max_series``) and start over with empty families.

    Raises:
        ValueError: ``max_series`` is below 1.
    """
    if max_series < 1:
        raise ValueError(f"ORCH_METRICS_MAX_SERIES must be at least 1, not {max_series}")
    _current.max_series = max_series
    reset()


def record_attempt(scope: AttemptScope) -> None:
    """Count the attempt's outcome and observe its duration and queue wait."""
    metrics = _metrics()
    info = scope.info
    workflow, step = _current.steps.admit((_label(info.workflow), _label(info.step)))
    kind = _label(info.kind)
    outcome = _label(scope.outcome)
    metrics.child(metrics.step_attempts, workflow, step, kind, outcome, _label(scope.error_kind)).inc()
    metrics.child(metrics.step_duration, workflow, step, kind, outcome).observe(
        max(0.0, time.monotonic() - scope.entered_monotonic)
    )
    wait = info.queue_wait_s
    if wait is not None:
        metrics.child(metrics.queue_wait, workflow, step, _label(info.queue)).observe(wait)


def record_llm_call(record: LLMCallRecord) -> None:
    """Count an LLM call's tokens and cost, or a reply cache hit."""
    metrics = _metrics()
    workflow, model = _current.models.admit((_label(record.workflow), _label(record.model)))
    if record.cached:
        metrics.child(metrics.cache_hits, workflow, model).inc()
        return
    outcome = "error" if record.error_kind else "ok"
    metrics.child(metrics.llm_calls, workflow, model, outcome, _label(record.error_kind)).inc()
    metrics.child(metrics.llm_duration, workflow, model).observe(max(0.0, record.duration_s))
    for token_type, count in (("input", record.input_tokens), ("output", record.output_tokens)):
        if count > 0:
            metrics.child(metrics.llm_tokens, workflow, model, token_type).inc(count)
    if record.cost_usd:
        metrics.child(metrics.llm_cost, workflow, model).inc(record.cost_usd)


def record_deferral(workflow: str, model: str, reason: str) -> None:
    """Count a step deferred to wait for a shared rate limit (``rate_limit``) or a cool-down (``cooldown``)."""
    metrics = _metrics()
    workflow, model = _current.models.admit((_label(workflow), _label(model)))
    metrics.child(metrics.deferrals, workflow, model, _label(reason)).inc()


def _label(value: str | None) -> str:
    return (value or "")[:_MAX_LABEL]
