"""Connection pools that hand out a connection back from a command moments ago without polling it first.

Before redis-py's pool hands out a connection it polls the socket (``Connection.can_read``): data waiting there means
either a reply left unread by an earlier command, which the next command would take for its own, or the server
closing the connection, which a reconnection hides from the caller. That poll is a system call per command, and in a
threads worker every system call lets go of the GIL and waits to get it back from one of the other few hundred threads
(about 5% of the llm worker's GIL time under load). This pool skips the poll when the connection came back to it less
than :data:`QUICK_REUSE_S` ago, and polls as redis-py does otherwise.

No reply can be left unread on such a connection: redis-py disconnects a connection on any exception (``BaseException``
included) while it sends a command or reads its reply (``send_packed_command``, ``read_response`` with its default
``disconnect_on_error``), a transaction reads every reply before it parses any, and a plain pipeline reads every reply
whatever the server answered (only a response callback raising could stop it half way, and the commands the
store pipelines have callbacks that parse integers and strings). Pub/sub connections, the only ones that read with
``disconnect_on_error=False``, are disconnected before they go back to the pool.

What the skipped poll could still find is a server closing the connection within those milliseconds. A restart cannot
be it: the new server answers only after the old one closed every connection, longer ago than the window (a restart
here takes over 100 ms), so the first command after it finds its connection polled, closed and replaced, as before.
``CLIENT KILL``, a proxy or the network cutting the connection just then fails the one command sent on it with
``ConnectionError`` (the server never saw it), as any command in flight at that moment fails; the store treats both
alike, as an outage. Under load a connection is back in the pool for far less than the window (the llm worker skips
about three polls in four); a quiet process polls as redis-py does. Redis's own idle ``timeout`` (whole seconds) cannot
close a connection idle for less than the window.
"""

from __future__ import annotations

import time
from typing import Any

import redis

QUICK_REUSE_S = 0.005
"""A connection back in the pool for less than this many seconds is handed out without polling its socket: shorter
than any restart of a Redis server, longer than most connections wait in the pool of a busy worker."""


class _QuickReuse:
    """Mixed into the pool's connection class: the first ``can_read()`` after a quick return to the pool is skipped."""

    released_at = 0.0
    """When the pool last took this connection back (``time.monotonic()``), 0 once anything polled it since."""

    def can_read(self, timeout: float = 0) -> bool:
        released_at, self.released_at = self.released_at, 0.0
        if timeout == 0 and released_at and time.monotonic() - released_at < QUICK_REUSE_S:
            return False
        can_read: bool = super().can_read(timeout)  # type: ignore[misc]  # the class this is mixed into has it
        return can_read


_classes: dict[type[Any], type[Any]] = {}


def _quick_reuse(connection_class: type[Any]) -> type[Any]:
    if issubclass(connection_class, _QuickReuse):
        return connection_class
    if connection_class not in _classes:
        _classes[connection_class] = type(connection_class.__name__, (_QuickReuse, connection_class), {})
    return _classes[connection_class]


class _QuickReusePool:
    """Mixed into a redis-py pool: stamps each connection it takes back, with a connection class that reads the
    stamp."""

    def __init__(self, connection_class: type[Any] = redis.Connection, **kwargs: Any) -> None:
        super().__init__(connection_class=_quick_reuse(connection_class), **kwargs)  # type: ignore[call-arg]

    def release(self, connection: Any) -> None:
        # Stamped before it is back in the queue, where another thread can take it at once.
        connection.released_at = time.monotonic()
        super().release(connection)  # type: ignore[misc]


class QuickReusePool(_QuickReusePool, redis.BlockingConnectionPool):
    """redis-py's ``BlockingConnectionPool``, handing a connection released moments ago out without polling it."""


class QuickReuseConnectionPool(_QuickReusePool, redis.ConnectionPool):
    """redis-py's ``ConnectionPool`` (kombu's, for its publishes and acknowledgements), handing a connection
    released moments ago out without polling it."""
