"""One round trip to a single Redis for the hot paths: commands packed once, sent at once, their replies read in order.

redis-py's ``Pipeline.execute`` and ``Script.__call__`` wrap each round trip in machinery the store's hot paths do not
use: a ``Retry`` object and its closures, observability records, deprecated-argument checks, ``HIMPORT`` bookkeeping,
a per-argument generator in the packer, ``SCRIPT EXISTS`` for registered scripts. On this machine that is some 25 us
of client CPU on top of the 50 us a raw ``send``/``recv`` of the same commands costs, and a threads worker pays it
holding the GIL. :func:`execute` and :func:`run_script` do the round trip with redis-py's own pieces, and nothing more:

- the connection comes from the client's pool and goes back to it (``get_connection``/``release``, so the pool's
  limits, waiting and health checks hold);
- every command is packed by ``hiredis.pack_command`` (the packer redis-py's connection would use) into one buffer,
  sent with ``Connection.send_packed_command`` and its replies read with ``Connection.read_response``, which
  disconnect the connection on any error while sending or reading, as in redis-py;
- an error reply is that command's reply (a ``ResponseError``), the others' replies are read all the same; with
  ``raise_on_error`` the first is raised after every reply was read, annotated as redis-py's pipeline does;
- anything else raised before every reply was read (a response callback, an interrupt) disconnects the connection,
  so no unread reply goes back to the pool;
- a connection whose ``Retry`` allows retries runs the round trip through it, as redis-py does: the store's pools
  allow none (``ConnectionError`` and ``TimeoutError`` reach the caller's outage handling,
  :mod:`orchestrator.engine.outage`);
- the client's response callbacks apply as in redis-py (the hot paths' commands have none in RESP2).

A Redis Cluster client or pipeline, a subclass of redis-py's client or pipeline, a transaction, a pipeline that has
run commands or registered scripts already, a client with one pinned connection and a redis-py without hiredis take
redis-py's own path, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import redis
from redis.client import Pipeline
from redis.commands.core import Script
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE

if HIREDIS_AVAILABLE:
    from hiredis import pack_command

__all__ = ["execute", "run_command", "run_script"]

_Command = tuple[tuple[Any, ...], dict[str, Any]]


def execute(pipe: Pipeline, *, raise_on_error: bool = True) -> list[Any]:
    """``pipe.execute(raise_on_error)`` for a plain (non-transactional) pipeline, in one lean round trip.

    The replies come in the order of the commands; an error reply is a ``ResponseError`` in its place when
    ``raise_on_error`` is off. The pipeline is empty afterwards, as after ``execute``.

    Raises:
        redis.exceptions.ResponseError: With ``raise_on_error``, the first command's error reply.
        redis.exceptions.ConnectionError: Redis closed the connection or could not be reached (it is disconnected).
        redis.exceptions.TimeoutError: Redis did not answer within the socket timeout (likewise).
    """
    if not _lean_pipeline(pipe):
        return pipe.execute(raise_on_error=raise_on_error)
    stack: list[_Command] = pipe.command_stack
    pipe.command_stack = []
    if not stack:
        return []
    replies = _round_trip(pipe, stack)
    if raise_on_error:
        pipe.raise_first_error(stack, replies)  # type: ignore[no-untyped-call]
    return replies


def run_command(client: redis.Redis, *args: Any) -> Any:
    """``client.execute_command(*args)`` in one lean round trip (a command without redis-py options).

    Raises:
        redis.exceptions.ResponseError: The command's error reply.
        redis.exceptions.ConnectionError: See :func:`execute`.
        redis.exceptions.TimeoutError: See :func:`execute`.
    """
    if not _lean_client(client):
        return client.execute_command(*args)  # type: ignore[no-untyped-call]
    return _one(client, args)


def run_script(
    client: redis.Redis, script: Script, keys: Sequence[Any], args: Sequence[Any], *, load_first: Sequence[Script] = ()
) -> Any:
    """``script(keys=keys, args=args, client=client)`` in one lean round trip by ``EVALSHA``.

    A script Redis does not know (``NOSCRIPT``: first use since a restart or ``SCRIPT FLUSH``) was not run: it is
    loaded and sent again, as redis-py's ``Script`` does; ``load_first`` are loaded ahead of it, for scripts that
    must be known wherever it is.

    Raises:
        redis.exceptions.ResponseError: The script's error reply.
        redis.exceptions.ConnectionError: See :func:`execute`.
        redis.exceptions.TimeoutError: See :func:`execute`.
    """
    if not _lean_client(client):
        return script(keys=list(keys), args=list(args), client=client)
    try:
        return _one(client, ("EVALSHA", script.sha, len(keys), *keys, *args))
    except redis.exceptions.NoScriptError:
        for other in load_first:
            client.script_load(other.script)
        script.sha = client.script_load(script.script)
        return _one(client, ("EVALSHA", script.sha, len(keys), *keys, *args))


def _lean_client(client: Any) -> bool:
    return (
        HIREDIS_AVAILABLE
        and type(client) is redis.Redis  # not a subclass: it may send commands its own way (fakeredis, a recorder)
        and client.connection is None
    )


def _lean_pipeline(pipe: Pipeline) -> bool:
    if not HIREDIS_AVAILABLE or type(pipe) is not Pipeline:  # a cluster pipeline, or one of redis-py's subclasses
        return False
    state: Any = pipe  # ``transaction`` is an attribute on a pipeline, a method on the client it derives from
    return not (state.transaction or state.explicit_transaction or state.watching or state.scripts or state.connection)


def _one(client: redis.Redis, args: tuple[Any, ...]) -> Any:
    reply = _round_trip(client, [(args, {})])[0]
    if isinstance(reply, redis.exceptions.ResponseError):
        raise reply
    return reply


def _round_trip(owner: redis.Redis, commands: list[_Command]) -> list[Any]:
    """Send ``commands`` on one of ``owner``'s pooled connections and read a reply (or its ``ResponseError``) each."""
    pool: Any = owner.connection_pool
    conn: Any = pool.get_connection()
    try:
        if conn.retry.get_retries():
            return cast(
                list[Any],
                conn.retry.call_with_retry(
                    lambda: _send_and_read(owner, conn, commands), lambda _error: conn.disconnect()
                ),
            )
        return _send_and_read(owner, conn, commands)
    except BaseException:
        # Replies may be left unread (redis-py disconnected already on a send or read error): never reuse it.
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


def _send_and_read(owner: Any, conn: Any, commands: list[_Command]) -> list[Any]:
    conn.send_packed_command(_pack(conn, commands))
    callbacks = owner.response_callbacks
    replies: list[Any] = []
    for args, options in commands:
        try:
            if options and (len(options) > 1 or "keys" not in options):
                # EMPTY_RESPONSE, NEVER_DECODE or a callback's option: redis-py's own parsing handles them all.
                replies.append(redis.Redis.parse_response(owner, conn, args[0], **options))  # type: ignore[no-untyped-call]
                continue
            reply = conn.read_response()
        except redis.exceptions.ResponseError as error:
            replies.append(error)
            continue
        callback = callbacks.get(args[0])
        replies.append(reply if callback is None else callback(reply))
    return replies


def _pack(conn: Any, commands: list[_Command]) -> list[bytes]:
    if type(conn._command_packer) is HiredisRespSerializer:
        try:
            # redis-py's packer splits a command name holding a space ("SCRIPT LOAD") and copies buffers to bytes.
            if all(isinstance(args[0], str) and " " not in args[0] for args, _ in commands):
                return [b"".join([pack_command(args) for args, _ in commands])]
        except TypeError:
            pass  # redis-py's packer raises its DataError for the same argument
    packed: list[bytes] = conn.pack_commands([args for args, _ in commands])
    return packed
