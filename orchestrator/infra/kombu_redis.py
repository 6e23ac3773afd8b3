"""kombu's Redis transport, with one synchronous redis-py client per channel instead of one per command.

kombu builds a new ``redis.Redis`` for every publish, acknowledgement and task event it sends outside its event loop
(``Channel.conn_or_acquire``), and redis-py copies about 170 response callbacks into each new client: about 0.3 ms of
CPU on this machine, several times per step, on every worker and producer. A client takes a connection from the
channel's pool per command and is safe to share between threads, so the channel keeps one (rebuilt if the channel
replaces its pool). Each message's delivery tag comes from :func:`orchestrator.infra.ids.new_id` instead of
``uuid.uuid4()`` (no system call per publish), and the pool of that client hands a connection back from a command
moments ago out without polling it (:mod:`orchestrator.infra.redis_pool`). Everything else is kombu's. :func:`install`
makes it what ``redis://`` broker URLs resolve to in this process (kombu's registry of transport names), so URLs, Flower
and ``celery -A`` stay as they are.
"""

from __future__ import annotations

from typing import Any, cast

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from orchestrator.infra.ids import new_id
from orchestrator.infra.redis_pool import QuickReuseConnectionPool

TRANSPORT = "orchestrator.infra.kombu_redis:Transport"
"""The transport's import path, as kombu's registry of transport names holds it."""


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, reusing its synchronous client."""

    _shared: tuple[Any, Any] | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        create = cast(Any, super())._create_client  # not in kombu's type stubs
        if asynchronous:
            return create(asynchronous=True)
        pool = self.pool
        shared = self._shared
        if shared is None or shared[0] is not pool:
            shared = self._shared = (pool, create())
        return shared[1]

    def _get_pool(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the event loop's connections (BRPOP) are kombu's own
            return cast(Any, super())._get_pool(asynchronous=True)
        params = self._connparams()  # type: ignore[attr-defined]  # not in kombu's type stubs
        self.keyprefix_fanout = self.keyprefix_fanout.format(db=params["db"])  # as kombu's own _get_pool
        return QuickReuseConnectionPool(**params)

    def _next_delivery_tag(self) -> str:
        # Unique among every producer's messages (it names the message in the unacked index), never parsed.
        return new_id()


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


def install() -> None:
    """Resolve ``redis://`` broker URLs to :class:`Transport` in this process (idempotent)."""
    TRANSPORT_ALIASES["redis"] = TRANSPORT
