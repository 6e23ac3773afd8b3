"""Messages waiting in the step queues, read from a Redis broker: for the queue-depth gauge and for the sweeper.

A step queue on Redis is several lists, one per priority level
(:func:`orchestrator.engine.priorities.redis_queue_lists`); its depth is their sum. A broker that is not Redis
(RabbitMQ, kombu's ``sentinel://`` form) cannot be read here: its depths are unknown (``None``).

Each step message carries the time it was sent (:data:`SENT_AT_HEADER`), so the sweeper can also tell how long the
oldest message of a queue has waited (:func:`oldest_sent_at`): kombu pushes on one end of a list and workers pop
from the other, so every message sent before the oldest one still waiting has already been taken.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence

import redis

from orchestrator.engine.priorities import redis_queue_lists
from orchestrator.infra.redis_url import is_redis_url, sync_client
from orchestrator.infra.settings import Settings

__all__ = [
    "SENT_AT_HEADER",
    "QueueBacklog",
    "broker_for",
    "oldest_sent_at",
    "queue_depths",
    "redis_broker_client",
]

log = logging.getLogger(__name__)

SOCKET_TIMEOUT_S = 5.0
SENT_AT_HEADER = "orch_sent_at"
"""The message header holding when a step message was sent (epoch seconds, the publisher's clock)."""


def redis_broker_client(url: str) -> redis.Redis | None:
    """A client of the broker at ``url`` when it is Redis, else ``None``."""
    # Kombu accepts several broker URLs separated by ';' for failover: read the first.
    first = url.split(";", 1)[0].strip()
    if not is_redis_url(first) or first.lower().startswith("sentinel://"):
        return None
    return sync_client(first, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S)


def broker_for(settings: Settings, state: redis.Redis) -> redis.Redis | None:
    """The broker's Redis for ``settings``: ``state`` itself when the broker is the state store's Redis."""
    url = settings.effective_broker_url
    return state if url == settings.redis_url else redis_broker_client(url)


def queue_depths(broker: redis.Redis, queues: Sequence[str]) -> dict[str, int]:
    """Messages waiting in each queue, all its priority lists added up, in one round trip."""
    pipe = broker.pipeline(transaction=False)
    for queue in queues:
        for name in redis_queue_lists(queue):
            pipe.llen(name)
    lengths = pipe.execute()
    per_queue = len(redis_queue_lists(""))
    return {queue: sum(int(n) for n in lengths[i * per_queue : (i + 1) * per_queue]) for i, queue in enumerate(queues)}


def oldest_sent_at(broker: redis.Redis, queues: Sequence[str]) -> float | None:
    """When the oldest message still waiting in ``queues`` was sent, in one round trip; ``None`` when all are empty.

    The oldest message of each priority list is the one workers take next. A message without a readable
    :data:`SENT_AT_HEADER` (sent by a plain Celery client, or by an older producer) counts as sent at 0, as old as
    can be: a caller that holds copies back while old messages wait then holds them back, as it would without this.
    """
    pipe = broker.pipeline(transaction=False)
    for queue in queues:
        for name in redis_queue_lists(queue):
            pipe.lindex(name, -1)
    sent = [_sent_at(raw) for raw in pipe.execute() if raw is not None]
    return min(sent, default=None)


def _sent_at(raw: bytes | str) -> float:
    try:
        value = json.loads(raw)["headers"][SENT_AT_HEADER]
        return float(value)
    except (ValueError, TypeError, KeyError):
        return 0.0


class QueueBacklog:
    """The messages waiting in each of some queues, all read at most once per ``refresh_s`` (one round trip) and
    remembered between reads; safe to share between threads (one reads, the others take the last values meanwhile).

    Args:
        broker: The broker's Redis.
        queues: The queues read, each on its own (its priority lists added up).
        refresh_s: How long a read is trusted.
        clock: Seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        broker: redis.Redis,
        queues: Sequence[str],
        *,
        refresh_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker = broker
        self.queues = tuple(queues)
        self.refresh_s = refresh_s
        self._clock = clock
        self._read_at = float("-inf")
        self._waiting: dict[str, int] = {}
        self._reading = threading.Lock()

    def waiting(self, queue: str) -> int:
        """The messages waiting in ``queue`` as last read (0 for a queue not read, or when Redis did not answer)."""
        if self._stale() and self._reading.acquire(blocking=False):
            try:
                if self._stale():  # another thread may have read meanwhile
                    self._read()
            finally:
                self._reading.release()
        return self._waiting.get(queue, 0)

    def _read(self) -> None:
        try:
            self._waiting = queue_depths(self.broker, self.queues) if self.queues else {}
        except Exception as exc:  # advisory: no error of a read may reach the step asking
            log.debug("cannot read the depth of %s: %s", ", ".join(self.queues), exc)
            self._waiting = {}
        self._read_at = self._clock()

    def _stale(self) -> bool:
        return self._clock() - self._read_at >= self.refresh_s
