"""What a process needs to run steps and sweeps, built once per process (after fork) from the settings."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from orchestrator.definition.registry import functions, import_modules
from orchestrator.engine.backlog import broker_for
from orchestrator.engine.delta_sink import RedisDeltaSink
from orchestrator.engine.leases import LeaseKeeper
from orchestrator.engine.local import LocalSteps
from orchestrator.engine.publisher import StepPublisher
from orchestrator.engine.steps import StepExecutor
from orchestrator.infra.settings import Settings
from orchestrator.llm import make_llm_client
from orchestrator.llm.cache import ReplyCache
from orchestrator.llm.gateway import LLMGateway
from orchestrator.llm.governor import RateLimits, RedisGovernor
from orchestrator.llm.pricing import PriceTable
from orchestrator.state import RedisStateStore, StateStore


@dataclass
class Runtime:
    """The state store, step executor, lease keeper and publisher of one process.

    Attributes:
        interrupts: What the worker pool raises inside a step to stop it at its time limit (Celery's
            ``SoftTimeLimitExceeded`` on prefork); an attempt that sees one records a timeout.
        broker: The broker's Redis, to read queue depths; ``None`` when the broker is not Redis.
        local: Lets a finishing step run a child it released in its own slot (a worker's); ``None`` publishes all.
    """

    settings: Settings
    store: StateStore
    executor: StepExecutor
    leases: LeaseKeeper
    publisher: StepPublisher
    broker: redis.Redis | None = None
    interrupts: tuple[type[BaseException], ...] = field(default=())
    local: LocalSteps | None = None


class RuntimeHolder:
    """Builds the :class:`Runtime` lazily and again after a fork (Redis connections must not cross processes).

    Args:
        settings: Where Redis is, limits, the LLM provider.
        publisher: Builds the process's publisher (called once per process).
        interrupts: See :attr:`Runtime.interrupts`.
        local: Builds :attr:`Runtime.local` from the process's publisher (``None``: every child is published).
    """

    def __init__(
        self,
        settings: Settings,
        publisher: Callable[[], StepPublisher],
        *,
        interrupts: tuple[type[BaseException], ...] = (),
        local: Callable[[StepPublisher], LocalSteps] | None = None,
    ) -> None:
        self.settings = settings
        self._publisher = publisher
        self._interrupts = interrupts
        self._local = local
        self._runtime: Runtime | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def get(self) -> Runtime:
        """This process's runtime."""
        with self._lock:
            if self._runtime is None or self._pid != os.getpid():
                publisher = self._publisher()
                runtime = build_runtime(self.settings, publisher, interrupts=self._interrupts)
                if self._local is not None:
                    runtime.local = self._local(publisher)
                self._runtime = runtime
                self._pid = os.getpid()
            return self._runtime


def build_runtime(
    settings: Settings,
    publisher: StepPublisher,
    *,
    interrupts: tuple[type[BaseException], ...] = (),
    store: StateStore | None = None,
    **executor_options: Any,
) -> Runtime:
    """A runtime on Redis at ``settings.redis_url`` (or ``store``), with the LLM gateway the settings describe."""
    import_modules(settings.imports)
    redis_store = store or RedisStateStore.from_url(
        settings.redis_url,
        retention_s=settings.retention_s,
        shards=settings.shards,
        wait_replicas=settings.wait_replicas,
    )
    client = redis_store.client if isinstance(redis_store, RedisStateStore) else None
    if client is not None:
        executor_options.setdefault("deltas", RedisDeltaSink(client))
    executor = StepExecutor(
        make_gateway(settings, client),
        functions,
        max_output_bytes=settings.max_output_bytes,
        max_prompt_bytes=settings.max_prompt_bytes,
        llm_timeout_s=settings.llm_timeout_s,
        interrupts=interrupts,
        template_timeout_s=settings.template_timeout_s,
        **executor_options,
    )
    leases = LeaseKeeper(redis_store, settings.lease_s)
    broker = broker_for(settings, client) if client is not None else None
    return Runtime(settings, redis_store, executor, leases, publisher, broker, interrupts)


def make_gateway(settings: Settings, client: redis.Redis | None) -> LLMGateway:
    """The LLM gateway: the provider the settings name, with prices, shared limits and the reply cache in Redis."""
    llm = make_llm_client(settings.anthropic_api_key, settings.anthropic_base_url, settings.llm_timeout_s)
    if client is None:
        return LLMGateway(llm, prices=PriceTable.from_json(settings.llm_prices))
    return LLMGateway(
        llm,
        prices=PriceTable.from_json(settings.llm_prices),
        governor=RedisGovernor(client, RateLimits.from_json(settings.llm_limits)),
        cache=ReplyCache(client, run_ttl_s=settings.retention_s, shared_ttl_s=settings.shared_reply_ttl_s),
        shared_cooldown=settings.llm_shared_cooldown,
    )
