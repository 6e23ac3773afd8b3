"""Typed settings, read once from the environment at the edge (``Settings.from_env()``).

Every default is named and documented here; the README's configuration table mirrors this file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from orchestrator.infra.cpus import parse_cpus
from orchestrator.infra.redis_cluster import is_cluster_url, parse_cluster_url
from orchestrator.infra.redis_url import (
    RedisUrlError,
    check_memory_url,
    check_url_form,
    is_memory_url,
    is_sentinel_url,
    parse_sentinel_url,
    redact_url,
)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

MAX_SHARDS = 256
"""``ORCH_SHARDS`` at most: each shard is a few sorted sets every sweep reads."""
MAX_WAIT_REPLICAS = 16
"""``ORCH_WAIT_REPLICAS`` at most."""
MIN_GIL_SWITCH_S, MAX_GIL_SWITCH_S = 0.001, 1.0
"""``ORCH_GIL_SWITCH_S`` bounds: below a millisecond threads hand over more often than Python's default; above a
second a busy thread would hold the heartbeat and the broker's consumer up for that long."""
MIN_GC_THRESHOLD, MAX_GC_THRESHOLD = 100, 1_000_000
"""``ORCH_GC_THRESHOLD`` bounds: below a hundred the collector would run every few allocations; above a million a
collection of the youngest objects would hold the interpreter for most of a second."""

PRIORITY_MODES = ("depth", "off")
"""``ORCH_PRIORITIES`` values: ``depth`` sends each step with its DAG depth as priority, ``off`` sends none (FIFO)."""


def _parse_bool(raw: str) -> bool:
    return raw.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """Everything configurable, with its environment variable.

    Attributes:
        redis_url: ``REDIS_URL``: state store, broker and result backend (password/TLS go in the URL);
            ``redis+sentinel://HOST:26379[,HOST:26379]/MASTER_NAME[/DB]`` finds the master through Sentinel
            (the form is in ``orchestrator.infra.redis_url``). ``memory://`` runs everything in one process: state in
            its memory, steps on its own threads (``inprocess_threads``); for quick local runs, notebooks and tests,
            refused by workers, the API server and the sweeper service (see the architecture page). A URL without
            one of ``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://``, ``rediss+sentinel://``,
            ``memory://`` is refused at start in one line naming the accepted forms.
            ``redis+cluster://HOST:PORT[,HOST:PORT...]/`` (``rediss+cluster://`` with TLS) keeps state in a Redis
            Cluster; ``ORCH_BROKER_URL`` must then name the broker.
        broker_url: ``ORCH_BROKER_URL``: a different broker (e.g. RabbitMQ, or Redis through Sentinel), defaults to
            ``redis_url``. Takes the Redis forms (not ``memory://``, not a cluster), ``amqp://``, ``amqps://`` and
            kombu's other transports; a URL without a known scheme is refused at start.
        shards: ``ORCH_SHARDS``: how many buckets each global index (leases, deadlines, approvals, runs, the
            global event stream) is split into, each under its own hash tag, so that in a Redis Cluster their load
            spreads over the masters instead of one hot slot; the sweepers split the buckets between them, each
            sweeping its own. 1 (default) keeps one key per index, as on a single Redis; on a cluster take about 4
            per master (12 for 3 masters). Changing it later leaves entries in the old buckets unswept: set it
            once, before the first run.
        wait_replicas: ``ORCH_WAIT_REPLICAS``: after every step claim and finish, wait (Redis ``WAIT``, at most 1 s)
            until this many replicas of the run's master have its writes, which narrows what a failover can lose
            (replication is asynchronous) at one replica round trip per transition. 0 (default) does not wait; it
            is no guarantee either way (see docs/cluster.md).
        anthropic_api_key: ``ANTHROPIC_API_KEY``; when absent LLM steps use the offline provider.
        anthropic_base_url: ``ANTHROPIC_BASE_URL``: another Messages API endpoint.
        imports: ``ORCH_IMPORTS``: comma-separated modules defining workflows and functions, imported by
            workers and by the CLI (like Celery's ``imports``).
        retention_s: ``ORCH_RETENTION_S``: how long a finished run's state is kept (default 7 days).
        lease_s: ``ORCH_LEASE_S``: a claimed attempt's lease, and how long one heartbeat of the process running
            attempts keeps it known alive (it beats every third of it). A step whose worker died is re-dispatched
            within about ``lease_s + sweep_interval_s``.
        sweep_interval_s: ``ORCH_SWEEP_INTERVAL_S``: how often workers look for expired leases and deadlines.
        queued_grace_s: ``ORCH_QUEUED_GRACE_S``: how long a delayed retry or a re-dispatched step may wait in the
            queue before the sweeper sends it again (a copy that arrives late finds the step taken).
        outage_patience_s: ``ORCH_OUTAGE_PATIENCE_S``: how long a step task waits for Redis or the broker to answer
            before it gives up a state transition or a publish (the step's lease then lets the sweeper take over).
        visibility_timeout_s: ``ORCH_VISIBILITY_TIMEOUT_S``: Redis broker visibility timeout; longer than any
            retry countdown or LLM call so Redis itself never redelivers a message that is still being worked.
            Only read with ``broker_unacked_index``.
        broker_unacked_index: ``ORCH_BROKER_UNACKED_INDEX``: on a Redis broker, have kombu also copy every message a
            worker takes into its ``unacked`` hash and index (and delete it there at the acknowledgement), to put it
            back after ``visibility_timeout_s`` if the worker dies. Off by default: the lease index already covers
            every step message (a dead worker's steps are sent again after their lease or ``queued_grace_s``, far
            sooner), and the copy cost two round trips and a JSON encoding of the message per step; a worker
            stopping or losing its connection still hands back the messages it took and has not acknowledged.
        max_input_bytes: ``ORCH_MAX_INPUT_BYTES``: cap on a run's serialized inputs.
        max_output_bytes: ``ORCH_MAX_OUTPUT_BYTES``: cap on one step's serialized output (compact JSON, UTF-8).
        max_prompt_bytes: ``ORCH_MAX_PROMPT_BYTES``: cap on an ``llm`` step's rendered prompt and system prompt
            together (UTF-8); a larger one fails the step (``prompt_too_large``) before any LLM call.
        max_steps: ``ORCH_MAX_STEPS``: cap on steps per workflow.
        max_subflow_depth: ``ORCH_MAX_SUBFLOW_DEPTH``: how deep runs may nest through ``uses: workflow`` steps (a
            top-level run is depth 1); deeper trees are refused at submit, and a child past it fails its step.
        template_timeout_s: ``ORCH_TEMPLATE_TIMEOUT_S``: seconds one prompt render or condition may run (a step's
            ``timeout_s`` can shorten it); past it the step fails as ``template_limit``.
        retry_cap_s: ``ORCH_RETRY_CAP_S``: no retry waits longer, whatever ``retry-after`` says.
        llm_timeout_s: ``ORCH_LLM_TIMEOUT_S``: default per-call LLM timeout.
        llm_queue: ``ORCH_LLM_QUEUE``: queue for ``llm`` steps.
        cpu_queue: ``ORCH_CPU_QUEUE``: queue for every other step kind.
        llm_prices: ``ORCH_LLM_PRICES``: JSON ``{"MODEL": {"input": USD, "output": USD}}`` per million tokens,
            over the built-in Claude prices.
        llm_limits: ``ORCH_LLM_LIMITS``: JSON ``{"MODEL": {"rpm": N, "tpm": N}, "*": {...}}``: cluster-wide
            requests and tokens per minute per model (none by default).
        shared_reply_ttl_s: ``ORCH_SHARED_REPLY_TTL_S``: how long a reply cached across runs is kept.
        metrics_port: ``ORCH_METRICS_PORT``: a worker serves Prometheus metrics of all its pool processes on this
            port (default 0: no endpoint).
        metrics_addr: ``ORCH_METRICS_ADDR``: the address that endpoint listens on.
        metrics_max_series: ``ORCH_METRICS_MAX_SERIES``: distinct ``(workflow, step)`` and ``(workflow, model)``
            label pairs each worker process reports by name; later ones go under ``workflow="_other"`` (names come
            from submitted definitions, so they are bounded here).
        metrics_cluster: ``ORCH_METRICS_CLUSTER``: the worker's endpoint also exports the cluster gauges (queue
            depth, runs in flight), which otherwise only the API's ``/metrics`` does; for a deployment without the
            API, set it on one worker only, or every worker reports the same cluster and a sum counts it many times.
        log_format: ``ORCH_LOG_FORMAT``: ``json`` (one JSON object a line), ``text``, or ``auto``: text when
            the log goes to a terminal, JSON otherwise (files, containers, pipes).
        log_level: ``ORCH_LOG_LEVEL``: ``DEBUG``, ``INFO`` …; default: the worker's ``--loglevel``, ``INFO``
            for the API.
        llm_shared_cooldown: ``ORCH_LLM_SHARED_COOLDOWN``: a provider's ``retry-after`` pauses every worker's calls
            to that model (default on; off leaves each task to its own retry, for comparison).
        priorities: ``ORCH_PRIORITIES``: ``depth`` (default): a step deeper in its DAG is taken from the queue
            first, so runs in flight finish before new ones start (:mod:`orchestrator.engine.priorities`); ``off``:
            first in, first out.
        rabbitmq_priority_queues: ``ORCH_RABBITMQ_PRIORITY_QUEUES``: declare step queues with ``x-max-priority``
            so RabbitMQ honours priorities (default off: RabbitMQ refuses to redeclare an existing queue with another
            argument, so existing queues must be deleted first).
        map_max_items: ``ORCH_MAP_MAX_ITEMS``: the most items a ``for_each`` list may have; a longer one fails
            its step (not retried).
        inprocess_threads: ``ORCH_INPROCESS_THREADS``: with ``REDIS_URL=memory://``, how many steps the process runs
            at once on its own threads.
        gil_switch_s: ``ORCH_GIL_SWITCH_S``: a worker's Python switch interval (``sys.setswitchinterval``): how
            long a thread runs before a thread waiting for the interpreter makes it hand over. A threads worker's
            hundreds of slots mostly wait on I/O and hand the interpreter over at each wait anyway; Python's 5 ms
            also forced hand-overs in between, which at 500 slots cost CPU and let a step's run time stretch (see
            docs/benchmarks.md). Default 0.1; from 0.001 to 1.
        gc_threshold: ``ORCH_GC_THRESHOLD``: a worker's threshold for collecting its youngest objects
            (``gc.set_threshold``), which also sets how often the older ones are collected. Python's 700 made a
            busy threads worker spend 7.6% of its CPU in the cyclic garbage collector, most of it scanning the whole
            heap with the interpreter held for 200 ms at a time; at 20,000 it spends about 2.4%, in pauses of about
            25 ms (one in ten about 90 ms), and garbage in cycles waits a little longer to be freed. Workers also
            freeze what they hold at start (``gc.freeze``), so that no collection scans it again. Default 20,000;
            from 100 to 1,000,000.
        worker_cpus: ``ORCH_WORKER_CPUS``: the CPUs a worker process runs on, a Linux CPU list (``1``, ``0,2``,
            ``2-3``): its threads, and a prefork pool's processes, stay there. A threads worker runs Python on one
            CPU at a time and hands the interpreter between its threads at every wait; pinned to one CPU, the
            hand-over does not wake another CPU and move the interpreter's state between caches (see
            docs/operations.md). Unset: wherever the system puts it. A worker refuses to start on a CPU it may not
            use.
    """

    redis_url: str = DEFAULT_REDIS_URL
    broker_url: str | None = None
    anthropic_api_key: str | None = None
    anthropic_base_url: str | None = None
    imports: tuple[str, ...] = ()
    retention_s: int = 7 * 24 * 3600
    lease_s: float = 6.0
    sweep_interval_s: float = 5.0
    queued_grace_s: float = 300.0
    outage_patience_s: float = 300.0
    visibility_timeout_s: int = 6 * 3600
    broker_unacked_index: bool = False
    max_input_bytes: int = 256 * 1024
    max_output_bytes: int = 1024 * 1024
    max_prompt_bytes: int = 4 * 1024 * 1024
    max_steps: int = 2000
    max_subflow_depth: int = 5
    template_timeout_s: float = 5.0
    retry_cap_s: float = 300.0
    llm_timeout_s: float = 120.0
    llm_queue: str = "llm"
    cpu_queue: str = "cpu"
    llm_prices: str | None = None
    llm_limits: str | None = None
    shared_reply_ttl_s: int = 7 * 24 * 3600
    metrics_port: int = 0
    metrics_addr: str = "0.0.0.0"
    metrics_max_series: int = 2000
    metrics_cluster: bool = False
    log_format: str = "auto"
    log_level: str | None = None
    llm_shared_cooldown: bool = True
    priorities: str = "depth"
    rabbitmq_priority_queues: bool = False
    inprocess_threads: int = 8
    gil_switch_s: float = 0.1
    gc_threshold: int = 20_000
    worker_cpus: str | None = None
    map_max_items: int = 10_000
    shards: int = 1
    wait_replicas: int = 0
    redis_url_explicit: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        # A URL without a scheme, or a typo in a Sentinel URL, fails at start with its cause, not at the first
        # connection (deep in a traceback) or, for the broker, as an AMQP host name that does not resolve.
        check_memory_url(self.redis_url)
        check_url_form(self.redis_url, "REDIS_URL")
        if self.broker_url is not None:
            check_url_form(self.broker_url, "ORCH_BROKER_URL")
        for url in (self.redis_url, self.broker_url):
            if url is not None and is_sentinel_url(url):
                parse_sentinel_url(url)
        if is_cluster_url(self.redis_url):
            parse_cluster_url(self.redis_url)
            if self.broker_url is None:
                raise RedisUrlError(
                    f"REDIS_URL={redact_url(self.redis_url)!r} is a Redis Cluster, which holds state but cannot be "
                    "Celery's broker: set ORCH_BROKER_URL to a plain Redis, a Sentinel URL or RabbitMQ"
                )
        if self.shards < 1 or self.shards > MAX_SHARDS:
            raise ValueError(f"ORCH_SHARDS must be from 1 to {MAX_SHARDS}, not {self.shards}")
        if self.wait_replicas < 0 or self.wait_replicas > MAX_WAIT_REPLICAS:
            raise ValueError(f"ORCH_WAIT_REPLICAS must be from 0 to {MAX_WAIT_REPLICAS}, not {self.wait_replicas}")
        if is_memory_url(self.redis_url) and self.broker_url is not None:
            raise ValueError(
                "ORCH_BROKER_URL cannot be used with REDIS_URL=memory://: that process runs its own steps "
                "without a broker; unset one of them"
            )
        if not MIN_GIL_SWITCH_S <= self.gil_switch_s <= MAX_GIL_SWITCH_S:
            bounds = f"from {MIN_GIL_SWITCH_S} to {MAX_GIL_SWITCH_S} seconds"
            raise ValueError(f"ORCH_GIL_SWITCH_S must be {bounds}, not {self.gil_switch_s}")
        if not MIN_GC_THRESHOLD <= self.gc_threshold <= MAX_GC_THRESHOLD:
            bounds = f"from {MIN_GC_THRESHOLD} to {MAX_GC_THRESHOLD}"
            raise ValueError(f"ORCH_GC_THRESHOLD must be {bounds}, not {self.gc_threshold}")
        if self.worker_cpus is not None:
            parse_cpus(self.worker_cpus)
        if self.inprocess_threads < 1:
            raise ValueError(f"ORCH_INPROCESS_THREADS must be at least 1, not {self.inprocess_threads}")
        if self.map_max_items < 0:
            raise ValueError(f"ORCH_MAP_MAX_ITEMS must be at least 0, not {self.map_max_items}")
        if self.metrics_max_series < 1:
            raise ValueError(f"ORCH_METRICS_MAX_SERIES must be at least 1, not {self.metrics_max_series}")
        if self.priorities not in PRIORITY_MODES:
            raise ValueError(f"ORCH_PRIORITIES must be one of {', '.join(PRIORITY_MODES)}, not {self.priorities!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read settings from ``environ`` (default ``os.environ``).

        Raises:
            ValueError: A number that does not parse, an unknown ``ORCH_PRIORITIES``, an ``ORCH_METRICS_MAX_SERIES``
                or ``ORCH_INPROCESS_THREADS`` below 1, an ``ORCH_GIL_SWITCH_S`` or ``ORCH_GC_THRESHOLD`` out of its
                bounds, an ``ORCH_WORKER_CPUS`` that is not a CPU list, ``ORCH_BROKER_URL`` with
                ``REDIS_URL=memory://``, or a URL without a scheme, with an unknown one, or a malformed Sentinel or
                ``memory:`` URL (``RedisUrlError``).
        """
        env = os.environ if environ is None else environ
        names = {
            "redis_url": "REDIS_URL",
            "broker_url": "ORCH_BROKER_URL",
            "anthropic_api_key": "ANTHROPIC_API_KEY",
            "anthropic_base_url": "ANTHROPIC_BASE_URL",
            "imports": "ORCH_IMPORTS",
            "retention_s": "ORCH_RETENTION_S",
            "lease_s": "ORCH_LEASE_S",
            "sweep_interval_s": "ORCH_SWEEP_INTERVAL_S",
            "queued_grace_s": "ORCH_QUEUED_GRACE_S",
            "outage_patience_s": "ORCH_OUTAGE_PATIENCE_S",
            "visibility_timeout_s": "ORCH_VISIBILITY_TIMEOUT_S",
            "broker_unacked_index": "ORCH_BROKER_UNACKED_INDEX",
            "max_input_bytes": "ORCH_MAX_INPUT_BYTES",
            "max_output_bytes": "ORCH_MAX_OUTPUT_BYTES",
            "max_prompt_bytes": "ORCH_MAX_PROMPT_BYTES",
            "max_steps": "ORCH_MAX_STEPS",
            "max_subflow_depth": "ORCH_MAX_SUBFLOW_DEPTH",
            "template_timeout_s": "ORCH_TEMPLATE_TIMEOUT_S",
            "retry_cap_s": "ORCH_RETRY_CAP_S",
            "llm_timeout_s": "ORCH_LLM_TIMEOUT_S",
            "llm_queue": "ORCH_LLM_QUEUE",
            "cpu_queue": "ORCH_CPU_QUEUE",
            "llm_prices": "ORCH_LLM_PRICES",
            "llm_limits": "ORCH_LLM_LIMITS",
            "shared_reply_ttl_s": "ORCH_SHARED_REPLY_TTL_S",
            "metrics_port": "ORCH_METRICS_PORT",
            "metrics_addr": "ORCH_METRICS_ADDR",
            "metrics_max_series": "ORCH_METRICS_MAX_SERIES",
            "metrics_cluster": "ORCH_METRICS_CLUSTER",
            "log_format": "ORCH_LOG_FORMAT",
            "log_level": "ORCH_LOG_LEVEL",
            "llm_shared_cooldown": "ORCH_LLM_SHARED_COOLDOWN",
            "priorities": "ORCH_PRIORITIES",
            "rabbitmq_priority_queues": "ORCH_RABBITMQ_PRIORITY_QUEUES",
            "inprocess_threads": "ORCH_INPROCESS_THREADS",
            "gil_switch_s": "ORCH_GIL_SWITCH_S",
            "gc_threshold": "ORCH_GC_THRESHOLD",
            "worker_cpus": "ORCH_WORKER_CPUS",
            "map_max_items": "ORCH_MAP_MAX_ITEMS",
            "shards": "ORCH_SHARDS",
            "wait_replicas": "ORCH_WAIT_REPLICAS",
        }
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict[str, object] = {}
        for attr, var in names.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            kind = kinds[attr]
            if attr == "imports":
                values[attr] = tuple(m.strip() for m in raw.split(",") if m.strip())
            elif kind == "int":
                values[attr] = int(raw)
            elif kind == "float":
                values[attr] = float(raw)
            elif kind == "bool":
                values[attr] = _parse_bool(raw)
            else:
                values[attr] = raw
        values["redis_url_explicit"] = bool(env.get("REDIS_URL"))
        return cls(**values)  # type: ignore[arg-type]

    @property
    def effective_broker_url(self) -> str:
        """The broker Celery connects to."""
        return self.broker_url or self.redis_url
