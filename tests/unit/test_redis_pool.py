"""The store's connection pool: a connection back from a command moments ago goes out again without a poll of its
socket, no reply of an earlier command, cut short by an error, can reach a later one, and the socket timeout is the
kernel's."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
import redis

from orchestrator.infra import redis_pool
from orchestrator.infra.kombu_redis import install
from orchestrator.infra.redis_roundtrip import run_command
from orchestrator.infra.redis_url import blocking_pool
from tests.conftest import private_redis


def _one_connection(redis_url: str, socket_timeout: float) -> redis.Redis:
    """A client on a one-connection pool of the kind the store uses, so every command reuses the same connection."""
    return redis.Redis(
        connection_pool=blocking_pool(redis_url, max_connections=1, timeout=5, socket_timeout=socket_timeout)
    )


@pytest.fixture
def pooled(redis_url: str) -> Iterator[redis.Redis]:
    client = _one_connection(redis_url, 5)
    yield client
    client.connection_pool.disconnect()


def _polls(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    polls: list[float] = []
    original = redis.Connection.can_read

    def counted(self: redis.Connection, timeout: float = 0) -> bool:
        polls.append(timeout)
        return original(self, timeout)

    monkeypatch.setattr(redis.Connection, "can_read", counted)
    return polls


def _kill(redis_url: str, victim: redis.Redis) -> None:
    """Have the server close ``victim``'s connection, and wait until the client list no longer holds it."""
    own_id = victim.client_id()
    admin = redis.Redis.from_url(redis_url)
    admin.client_kill_filter(_id=own_id)
    deadline = time.monotonic() + 5
    while any(c["id"] == str(own_id) for c in admin.client_list()):
        assert time.monotonic() < deadline, "the killed connection is still listed"
    admin.close()


def test_a_connection_back_from_a_command_moments_ago_is_handed_out_without_a_poll(
    pooled: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_pool, "QUICK_REUSE_S", 60.0)  # "moments ago", however slow this machine is today
    pooled.ping()
    polls = _polls(monkeypatch)

    assert pooled.echo("a") == b"a"
    pipe = pooled.pipeline(transaction=False)
    pipe.echo("b").echo("c")
    assert pipe.execute() == [b"b", b"c"]

    assert polls == []


def test_a_connection_idle_longer_is_polled_and_reconnected_when_the_server_closed_it(
    pooled: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_pool, "QUICK_REUSE_S", 0.0)  # every connection counts as idle long enough
    polls = _polls(monkeypatch)
    _kill(redis_url, pooled)

    assert pooled.echo("after the kill") == b"after the kill"  # the poll found it closed, so the pool reconnected
    assert polls


def test_a_command_timed_out_before_its_reply_leaves_no_reply_behind_for_the_next_one(redis_url: str) -> None:
    pooled = _one_connection(redis_url, 0.2)
    pooled.delete("empty-list")
    with pytest.raises(redis.TimeoutError):
        pooled.blpop(["empty-list"], timeout=1)  # the server answers nil after 1 s, long after the client gave up

    # Reused at once, unpolled: had the connection stayed open, this would read the BLPOP's nil once it came.
    assert pooled.echo("mine") == b"mine"
    assert pooled.echo("and mine") == b"and mine"
    pooled.connection_pool.disconnect()


def test_a_connection_the_server_closed_between_two_quick_commands_fails_one_command_then_reconnects(
    pooled: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_pool, "QUICK_REUSE_S", 60.0)  # the kill lands within the window, however long it takes
    pooled.ping()
    _kill(redis_url, pooled)

    with pytest.raises(redis.ConnectionError):
        pooled.echo("lost")  # sent on a closed connection: the server never ran it, as for one in flight
    assert pooled.echo("next") == b"next"


def test_kombus_publishes_and_acknowledgements_go_through_a_quick_reuse_pool_and_arrive(redis_url: str) -> None:
    install()
    with kombu.Connection(redis_url) as connection:
        queue = connection.SimpleQueue("quick-reuse-test")
        try:
            for n in range(3):
                queue.put({"n": n})
            got = []
            for _ in range(3):
                message = queue.get(timeout=5)
                got.append(message.payload["n"])
                message.ack()
            assert got == [0, 1, 2]
            assert isinstance(queue.channel.pool, redis_pool.QuickReuseConnectionPool)
        finally:
            queue.clear()
            queue.close()


def test_a_command_right_after_a_redis_restart_goes_out_on_a_new_connection() -> None:
    # The old server closed the pooled connection; the new one answers only after a restart far longer than the
    # window, so the connection is polled, found closed and replaced before the command is sent.
    with private_redis() as server:
        client = _one_connection(server.url, 5)
        client.ping()
        started = time.monotonic()
        server.restart()
        assert time.monotonic() - started > redis_pool.QUICK_REUSE_S
        assert client.echo("after the restart") == b"after the restart"
        client.connection_pool.disconnect()


def _timeval(sock: socket.socket, option: int) -> float:
    seconds, micros = struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("ll")))
    return float(seconds + micros / 1e6)


def test_the_store_pools_sockets_block_in_python_and_leave_the_timeout_to_the_kernel(redis_url: str) -> None:
    # A socket with a Python timeout is polled before every send and every read (each poll a GIL hand-over).
    client = _one_connection(redis_url, 2.5)
    client.ping()
    pool: Any = client.connection_pool
    connection = pool.get_connection()
    try:
        sock = connection._sock
        assert sock.gettimeout() is None
        assert _timeval(sock, socket.SO_RCVTIMEO) == 2.5
        assert _timeval(sock, socket.SO_SNDTIMEO) == 2.5
    finally:
        pool.release(connection)
        pool.disconnect()


def test_a_server_that_never_answers_fails_the_command_with_a_timeout_and_the_connection_is_dropped() -> None:
    accepted: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(5)
        port = server.getsockname()[1]
        client = _one_connection(f"redis://127.0.0.1:{port}/0", 0.3)
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(redis.TimeoutError, match=r"Redis silent for 0\.3s"):
                run_command(client, "PING")
            assert time.monotonic() - started >= 0.29
            accepted.append(server.accept()[0])  # each attempt on a new connection: the silent one was dropped
        assert len(accepted) == 2
        for sock in accepted:
            sock.close()
        client.connection_pool.disconnect()


def test_tls_connections_keep_pythons_socket_timeout() -> None:
    pool = blocking_pool("rediss://127.0.0.1:1/0", max_connections=1, timeout=1, socket_timeout=7)
    assert pool.connection_kwargs["socket_timeout"] == 7
    assert "kernel_timeout" not in pool.connection_kwargs
