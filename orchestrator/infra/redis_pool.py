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

The same pools enforce a ``socket_timeout`` in the kernel (``SO_RCVTIMEO``/``SO_SNDTIMEO``) on a socket Python sees
as blocking. Python polls a socket with a timeout before every send and every receive, and each poll lets go of the
GIL as the send or receive itself does: twice the GIL hand-overs per round trip. With 200 threads contending for
the GIL that cost about 50 us of client CPU per round trip (``python -m scripts.bench_roundtrip --threads 200``,
``docs/benchmarks.md``). A command Redis leaves unanswered still fails after the timeout, with redis-py's
``TimeoutError``, and its connection is dropped, as before. TLS connections keep Python's timeout.
"""

from __future__ import annotations

import socket
import struct
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


class _KernelTimeout:
    """Mixed into the pool's connection class: ``kernel_timeout`` seconds set as the socket's ``SO_RCVTIMEO`` and
    ``SO_SNDTIMEO`` (the connection's own ``socket_timeout`` is then ``None``), and the kernel's "no data in time"
    (``EAGAIN`` on a blocking socket, which redis-py reports as a connection error) raised as redis-py's
    ``TimeoutError``."""

    kernel_timeout: float | None = None

    def __init__(self, *args: Any, kernel_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kernel_timeout = kernel_timeout

    def _connect(self) -> socket.socket:
        sock: socket.socket = super()._connect()  # type: ignore[misc]  # the class this is mixed into has it
        if self.kernel_timeout:
            seconds = int(self.kernel_timeout)
            timeval = struct.pack("ll", seconds, int((self.kernel_timeout - seconds) * 1_000_000))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        return sock

    def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().send_packed_command(*args, **kwargs)  # type: ignore[misc]
        except redis.ConnectionError as exc:
            raise self._timed_out(exc, "writing to") from exc

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ConnectionError as exc:
            raise self._timed_out(exc, "reading from") from exc

    def _timed_out(self, exc: redis.ConnectionError, doing: str) -> redis.ConnectionError | redis.TimeoutError:
        if self.kernel_timeout and isinstance(exc.__context__, BlockingIOError):
            return redis.TimeoutError(f"Timeout {doing} socket: Redis silent for {self.kernel_timeout}s")
        return exc


_classes: dict[type[Any], type[Any]] = {}


def _connection_class(connection_class: type[Any]) -> type[Any]:
    if issubclass(connection_class, _QuickReuse):
        return connection_class
    if connection_class not in _classes:
        mixins = (_QuickReuse,) if issubclass(connection_class, redis.SSLConnection) else (_QuickReuse, _KernelTimeout)
        _classes[connection_class] = type(connection_class.__name__, (*mixins, connection_class), {})
    return _classes[connection_class]


class _QuickReusePool:
    """Mixed into a redis-py pool: stamps each connection it takes back, with a connection class that reads the
    stamp and, but for TLS, takes the socket timeout to the kernel."""

    def __init__(self, connection_class: type[Any] = redis.Connection, **kwargs: Any) -> None:
        connection_class = _connection_class(connection_class)
        timeout = kwargs.get("socket_timeout")
        if timeout and issubclass(connection_class, _KernelTimeout):
            kwargs.setdefault("socket_connect_timeout", timeout)  # redis-py's default for it is the socket timeout
            kwargs.update(socket_timeout=None, kernel_timeout=timeout)
        super().__init__(connection_class=connection_class, **kwargs)  # type: ignore[call-arg]

    def release(self, connection: Any) -> None:
        # Stamped before it is back in the queue, where another thread can take it at once.
        connection.released_at = time.monotonic()
        super().release(connection)  # type: ignore[misc]


class QuickReusePool(_QuickReusePool, redis.BlockingConnectionPool):
    """redis-py's ``BlockingConnectionPool``, handing a connection released moments ago out without polling it."""


class QuickReuseConnectionPool(_QuickReusePool, redis.ConnectionPool):
    """redis-py's ``ConnectionPool`` (kombu's, for its publishes and acknowledgements), handing a connection
    released moments ago out without polling it."""
