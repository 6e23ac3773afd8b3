"""What every route needs, built once by ``create_app`` and kept on ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import redis
import redis.asyncio as aioredis
from starlette.requests import HTTPConnection

from orchestrator.api.auth import ApiAuth
from orchestrator.api.metrics import ApiMetrics
from orchestrator.api.streams import EventHubs
from orchestrator.infra.settings import Settings

if TYPE_CHECKING:
    from orchestrator.client import Client


@dataclass(frozen=True)
class StreamLimits:
    """How event streams treat their clients.

    Attributes:
        queue_size: Events a client may have unsent before it is disconnected (it reconnects and loses nothing);
            streamed text does not count (a slow client's missed deltas are joined into one).
        keepalive_s: Seconds between SSE keep-alive comments.
        send_timeout_s: An SSE client that accepts no bytes for this long is disconnected.
        block_ms: How long a hub's ``XREAD`` blocks before asking again.
        read_batch: Events a hub reads at once; ``queue_size`` must be at least twice as many.
        list_scan: How many of the newest runs ``GET /runs`` looks through when filtering.
        redis_connections: Cap on the API's async Redis connections. Every watched run's hub holds one for its
            blocking ``XREAD``, so this bounds the runs watched at once (redis-py's own default of 100 would refuse
            clients beyond about 100 runs).
    """

    queue_size: int = 1000
    keepalive_s: float = 15.0
    send_timeout_s: float = 30.0
    block_ms: int = 5000
    read_batch: int = 100
    redis_connections: int = 10_000
    list_scan: int = 2000

    def __post_init__(self) -> None:
        if self.queue_size < 2 * self.read_batch:
            raise ValueError(f"queue_size ({self.queue_size}) must be at least twice read_batch ({self.read_batch})")


@dataclass(frozen=True)
class ApiContext:
    """The API's collaborators.

    Attributes:
        settings: Where Redis is, limits.
        client: Submits and controls runs (sync; routes using it run in the thread pool).
        auth: Tokens and scopes.
        metrics: The API's Prometheus metrics.
        redis: A sync Redis client (health, run listing, idempotency look-ups).
        aredis: An asyncio Redis client (event streams).
        hubs: The per-run event readers.
        streams: Limits for stream clients.
    """

    settings: Settings
    client: Client
    auth: ApiAuth
    metrics: ApiMetrics
    redis: redis.Redis
    aredis: aioredis.Redis
    hubs: EventHubs
    streams: StreamLimits


def api_context(connection: HTTPConnection) -> ApiContext:
    """The context of the app serving ``connection``."""
    return cast(ApiContext, connection.app.state.orchestrator)
