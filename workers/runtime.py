"""What a worker process needs to run steps, built once per process (after fork) from the settings."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from orchestrator.definition.registry import functions, import_modules
from orchestrator.engine.backlog import broker_for
from orchestrator.engine.steps import StepExecutor
from orchestrator.infra.settings import Settings
from orchestrator.llm import make_llm_client
from orchestrator.llm.cache import ReplyCache
from orchestrator.llm.gateway import LLMGateway
from orchestrator.llm.governor import RateLimits, RedisGovernor
from orchestrator.llm.pricing import PriceTable
from orchestrator.state import RedisStateStore, StateStore
from workers.leases import LeaseKeeper


@dataclass
class Runtime:
    """The state store, step executor and lease keeper of one worker process."""

    app: Celery
    settings: Settings
    store: StateStore
    executor: StepExecutor
    leases: LeaseKeeper
    broker: redis.Redis | None = None
    """The broker's Redis, to read queue depths; ``None`` when the broker is not Redis."""


class RuntimeHolder:
    """Builds the :class:`Runtime` lazily and again after a fork (Redis connections must not cross processes)."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._runtime: Runtime | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def get(self) -> Runtime:
        """This process's runtime."""
        with self._lock:
            if self._runtime is None or self._pid != os.getpid():
                self._runtime = self._build()
                self._pid = os.getpid()
            return self._runtime

    def _build(self) -> Runtime:
        settings = self.settings
        import_modules(settings.imports)
        store = RedisStateStore.from_url(settings.redis_url, retention_s=settings.retention_s)
        gateway = LLMGateway(
            make_llm_client(settings.anthropic_api_key, settings.anthropic_base_url, settings.llm_timeout_s),
            prices=PriceTable.from_json(settings.llm_prices),
            governor=RedisGovernor(store.client, RateLimits.from_json(settings.llm_limits)),
            cache=ReplyCache(store.client, run_ttl_s=settings.retention_s, shared_ttl_s=settings.shared_reply_ttl_s),
            shared_cooldown=settings.llm_shared_cooldown,
        )
        executor = StepExecutor(
            gateway,
            functions,
            max_output_bytes=settings.max_output_bytes,
            max_prompt_bytes=settings.max_prompt_bytes,
            llm_timeout_s=settings.llm_timeout_s,
            interrupts=(SoftTimeLimitExceeded,),
        )
        leases = LeaseKeeper(store, settings.lease_s)
        return Runtime(self.app, settings, store, executor, leases, broker_for(settings, store.client))
