"""What the metrics tests share: a module's own Redis database, a client, one worker exporting metrics, the API."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from urllib.parse import urlsplit

import redis
import uvicorn

from orchestrator import Client, Settings
from orchestrator.api import ApiAuth, create_app
from orchestrator.dev.local_workers import LocalWorkers
from tests.conftest import ARTIFACTS, WORKER_ENV
from tests.integration.helpers import wait_for


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metrics_env(redis_url: str, database: int) -> dict[str, str]:
    """Worker settings on ``database`` (emptied first), with a metrics endpoint on a free loopback port."""
    url = urlsplit(redis_url)._replace(path=f"/{database}").geturl()
    redis.Redis.from_url(url).flushdb()
    return {"REDIS_URL": url, **WORKER_ENV, "ORCH_METRICS_PORT": str(free_port()), "ORCH_METRICS_ADDR": "127.0.0.1"}


def metrics_client(env: dict[str, str]) -> Client:
    """A client on the module's database, with short retry delays."""
    return Client(replace(Settings.from_env(env), retry_cap_s=5.0))


@contextmanager
def one_worker(client: Client, env: dict[str, str]) -> Iterator[LocalWorkers]:
    """One worker process (two pool processes) exporting metrics, logging under ``test-artifacts/worker-logs``."""
    log_dir = ARTIFACTS / "worker-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with LocalWorkers(client.app, count=1, concurrency=2, env=env, log_dir=log_dir) as pool:
        yield pool


@contextmanager
def serve_api(client: Client, name: str) -> Iterator[int]:
    """The API under uvicorn in a thread (no tokens: loopback clients only); yields its port."""
    config = uvicorn.Config(
        create_app(client.settings, client, auth=ApiAuth()),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), timeout=20, what="uvicorn to start")
    assert server.started
    try:
        yield int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout=15)
