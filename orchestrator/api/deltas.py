"""Live ``llm_delta`` / ``llm_reset`` events for stream clients: the run's pub/sub channel, the text so far on join.

A run's :class:`~orchestrator.api.streams.RunHub` subscribes to the run's delta channel before any client reads the
text so far, so a client that joins mid-stream gets every piece exactly once: :func:`texts_so_far` (one
``llm_delta`` per streaming attempt), then the live deltas, each cut by
:class:`~orchestrator.engine.deltas.DeltaFilter` to what the text so far did not already hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from orchestrator.engine.deltas import Delta, texts_as_deltas
from orchestrator.infra.redis_cluster import is_cluster_client
from orchestrator.state import keys

log = logging.getLogger(__name__)

_GET_TIMEOUT_S = 1.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def texts_so_far(redis: aioredis.Redis, run_id: str) -> list[Delta]:
    """One ``llm_delta`` per step attempt of the run streaming now, holding its text so far (sorted by step)."""
    members = sorted(_text(member) for member in await redis.smembers(keys.stream_texts_key(run_id)))
    if not members:
        return []
    texts = await redis.mget([keys.stream_text_key(run_id, member) for member in members])
    return texts_as_deltas(members, [None if text is None else _text(text) for text in texts])


class DeltaFeed:
    """The subscription of one run's delta channel, handing each delta to ``deliver`` (the hub's fan-out).

    Args:
        redis: An asyncio Redis client.
        run_id: The run.
        deliver: Called with each delta, in order.
    """

    def __init__(self, redis: aioredis.Redis, run_id: str, deliver: Callable[[Delta], None]) -> None:
        self._pubsub = redis.pubsub(ignore_subscribe_messages=True)
        # A cluster carries a run's deltas on the shard of its channel (SPUBLISH, see ``queue_publish``).
        self._sharded = is_cluster_client(redis)
        self._channel = keys.deltas_channel(run_id)
        self._run_id = run_id
        self._deliver = deliver
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe (so deltas published from now on arrive), then read in a task.

        Raises:
            redis.RedisError: Redis does not answer.
        """
        if self._sharded:
            await self._pubsub.ssubscribe(self._channel)
        else:
            await self._pubsub.subscribe(self._channel)
        self._task = asyncio.get_running_loop().create_task(self._read(), name=f"delta-feed-{self._run_id}")

    async def stop(self) -> None:
        """Stop reading and give the connection back."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # redis-py leaves it unannotated

    async def _next_message(self) -> dict[str, Any] | None:
        if self._sharded:
            get_sharded: Any = self._pubsub.get_sharded_message  # type: ignore[attr-defined, unused-ignore]  # ClusterPubSub only
            reply: Any = await get_sharded(ignore_subscribe_messages=True, timeout=_GET_TIMEOUT_S)
            if reply is None:
                # With no message pending it returns at once: wait here as the plain read would.
                await asyncio.sleep(0.05)
            return cast(dict[str, Any] | None, reply)
        plain: Any = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=_GET_TIMEOUT_S)
        return cast(dict[str, Any] | None, plain)

    async def _read(self) -> None:
        backoff = 0.1
        while True:
            try:
                message = await self._next_message()
            except RedisError as exc:
                # redis-py reconnects and subscribes again on the next read; deltas sent meanwhile are lost (a
                # client's text then has a gap until the step ends and its output holds the whole text).
                log.warning("delta feed of run %s cannot read its channel: %s", self._run_id, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            if message is None or message.get("type") not in {"message", "smessage"}:
                continue
            delta = Delta.decode(message["data"])
            if delta is not None:
                self._deliver(delta)
