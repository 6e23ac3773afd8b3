"""Live run events for SSE and WebSocket clients: one Redis reader per run, fanned out to bounded client queues.

::

    Redis stream orch:{RUN}:events ──XREAD BLOCK──▶ RunHub(RUN) ──deliver()──▶ Subscription (one per SSE client)
                                                                └──────────▶ WebSocketProgressListener ─▶ WS clients

A :class:`RunHub` is the only reader of its run's stream, however many clients watch it, and it never waits for a
client: each client has its own bounded :class:`Subscription`, and one that falls behind on events is dropped (on
streamed text it gets the text it missed in one piece instead). A dropped client
reconnects with the last ``seq`` it got (``Last-Event-ID`` or ``?after=``) and loses nothing, because
:func:`follow` joins a client without gaps: it subscribes first (noting the hub's position), replays the stream from
the client's ``seq`` up to that position, then sends what the hub queued, skipping anything already sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from orchestrator.api.deltas import DeltaFeed, texts_so_far
from orchestrator.domain import RunStatus
from orchestrator.engine.deltas import Delta, DeltaFilter
from orchestrator.engine.events import Event, EventType, ProgressListener, deliver
from orchestrator.state import keys

log = logging.getLogger(__name__)

REPLAY_PAGE = 500
_RUN_ENDS = frozenset(t.value for t in EventType if t.ends_run)
L = TypeVar("L", bound=ProgressListener)


def ends_run(event: Event) -> bool:
    """Whether ``event`` is a run's final event (until a resume)."""
    return event.type in _RUN_ENDS


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _event(run_id: str, entry_id: Any, fields: Any) -> Event:
    return Event.from_stream(run_id, _text(entry_id), {_text(k): _text(v) for k, v in fields.items()})


class Subscription(ProgressListener):
    """One client's queue of live events and deltas; more than ``limit`` events unsent drops the client.

    Deltas never drop a client and never lengthen its queue much: a delta that continues the text of a delta still
    queued for the same attempt is added to that one, so a client that falls behind gets the text so far since its
    last delivered position in one piece, whatever it missed. At most one queued delta per streaming attempt (plus its
    resets) is in the queue, so a slow reader holds one copy of each streaming text at most.

    Attributes:
        position: The hub's last delivered ``seq`` when this subscribed: everything after it arrives here.
        dropped: The client fell behind and must reconnect.
        closed: Nothing more will arrive (dropped, or the hub is shutting down).
        coalesced: Deltas added to a queued one instead of queued apart.
    """

    def __init__(self, limit: int, position: int) -> None:
        self.position = position
        self.dropped = False
        self.closed = False
        self.coalesced = 0
        self._limit = limit
        self._events: deque[Event | _Queued] = deque()
        self._queued_events = 0
        # The last queued (not yet taken) delta of each streaming attempt, which a contiguous delta extends.
        self._open: dict[tuple[str, int | None, int], _Queued] = {}
        self._ready = asyncio.Event()

    def on_delta(self, delta: Delta) -> None:
        """Queue ``delta``, or add its text to the attempt's delta still queued (a reset is always queued apart)."""
        if self.closed:
            return
        key = (delta.step, delta.index, delta.attempt)
        held = self._open.get(key)
        if delta.type == "llm_delta" and held is not None and held.delta.offset + len(held.delta.text) == delta.offset:
            held.delta = replace(held.delta, text=held.delta.text + delta.text)
            self.coalesced += 1
            return
        queued = _Queued(delta)
        if delta.type == "llm_delta":
            self._open[key] = queued
        else:
            self._open.pop(key, None)
        self._events.append(queued)
        self._ready.set()

    def on_event(self, event: Event | Delta) -> None:
        """Queue ``event``; more than ``limit`` unsent events drops the client instead of waiting for it."""
        if isinstance(event, Delta):
            self.on_delta(event)
            return
        if self.closed:
            return
        if self._queued_events >= self._limit:
            self.dropped = True
            self._events.clear()
            self._open.clear()
            self.close()
            return
        self._events.append(event)
        self._queued_events += 1
        self._ready.set()

    def close(self) -> None:
        """Stop: the consumer gets what is queued (nothing, when dropped), then ``None``."""
        self.closed = True
        self._ready.set()

    @property
    def pending(self) -> int:
        """Events queued and not taken yet."""
        return len(self._events)

    async def next(self) -> Event | Delta | None:
        """The next queued event or delta, waiting for one; ``None`` once closed and drained."""
        while True:
            if self._events:
                item = self._events.popleft()
                if isinstance(item, Event):
                    self._queued_events -= 1
                    return item
                key = (item.delta.step, item.delta.index, item.delta.attempt)
                if self._open.get(key) is item:
                    del self._open[key]  # taken: later text queues anew
                return item.delta
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()


class _Queued:
    """A queued delta, which later contiguous text of its attempt extends until the client takes it."""

    __slots__ = ("delta",)

    def __init__(self, delta: Delta) -> None:
        self.delta = delta


class RunHub:
    """The single reader of one run's event stream, delivering each event to every listener in order.

    Attributes:
        run_id: The run.
        position: The ``seq`` of the last event delivered (events after it are still to come).
        listeners: Who gets every event: client subscriptions and shared listeners.
    """

    def __init__(self, redis: aioredis.Redis, run_id: str, position: int, *, block_ms: int, batch: int) -> None:
        self.redis = redis
        self.run_id = run_id
        self.position = position
        self.listeners: set[ProgressListener] = set()
        self.clients = 0
        self._block_ms = block_ms
        self._batch = batch
        self._shared: dict[type[ProgressListener], ProgressListener] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._deltas = DeltaFeed(redis, run_id, self._deliver_delta)

    async def start(self) -> None:
        """Subscribe to the run's deltas, then start reading its events (in a task of the running loop).

        Raises:
            redis.RedisError: Redis does not answer.
        """
        await self._deltas.start()
        self._task = asyncio.get_running_loop().create_task(self._read(), name=f"event-hub-{self.run_id}")

    def _deliver_delta(self, delta: Delta) -> None:
        for listener in list(self.listeners):
            try:
                listener.on_delta(delta)
            except Exception:
                log.exception("listener %r failed on a delta of run %s", listener, self.run_id)

    def subscribe(self, limit: int) -> Subscription:
        """A new client queue receiving every event after the hub's current position."""
        subscription = Subscription(limit, self.position)
        self.listeners.add(subscription)
        return subscription

    def unsubscribe(self, listener: ProgressListener) -> None:
        """Stop delivering to ``listener``."""
        self.listeners.discard(listener)
        if isinstance(listener, Subscription):
            listener.close()

    def shared(self, kind: type[L], factory: Callable[[], L]) -> L:
        """The hub's one listener of type ``kind``, made by ``factory`` and registered on first use."""
        listener = self._shared.get(kind)
        if listener is None:
            listener = self._shared[kind] = factory()
            self.listeners.add(listener)
        assert isinstance(listener, kind)
        return listener

    async def stop(self) -> None:
        """Stop reading and close every subscription."""
        self._stopped = True
        await self._deltas.stop()
        if self._task is not None:
            # redis.asyncio can swallow a cancel that lands while a command is being sent (the command then runs to
            # its end): the flag stops the loop after that XREAD at the latest.
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), self._block_ms / 1000 + 5)
        for listener in list(self.listeners):
            if isinstance(listener, Subscription):
                listener.close()

    async def _read(self) -> None:
        key = keys.events_key(self.run_id)
        backoff = 0.1
        while not self._stopped:
            try:
                reply: Any = await self.redis.xread(
                    {key: f"0-{self.position}"}, block=self._block_ms, count=self._batch
                )
            except RedisError as exc:
                # Clients stay connected (keep-alives go on) and get everything once Redis answers again.
                log.warning("event hub of run %s cannot read its stream: %s", self.run_id, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            for _, rows in reply or []:
                for entry_id, fields in rows:
                    event = _event(self.run_id, entry_id, fields)
                    if event.seq <= self.position:
                        continue
                    self.position = event.seq
                    for listener in list(self.listeners):
                        deliver(listener, event)


class EventHubs:
    """The hubs of the runs someone is watching, made on first client and stopped after the last.

    Args:
        redis: An asyncio Redis client (no socket timeout shorter than ``block_ms``).
        block_ms: How long one ``XREAD`` blocks before the hub asks again.
        batch: Events one ``XREAD`` returns at most; a client's queue must hold more than this, so a burst alone
            never drops a client that keeps up (it drains while the hub waits for the next batch).
        on_change: Called with the number of hubs whenever it changes (for metrics).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        block_ms: int = 5000,
        batch: int = 100,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.redis = redis
        self._block_ms = block_ms
        self._batch = batch
        self._hubs: dict[str, RunHub] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._on_change = on_change or (lambda _: None)

    def __len__(self) -> int:
        return len(self._hubs)

    async def open(self, run_id: str) -> RunHub:
        """The run's hub, started if needed; every :meth:`open` must be paired with a :meth:`release`.

        Raises:
            redis.RedisError: When the hub had to be made and Redis does not answer.
        """
        async with self._lock:
            hub = self._hubs.get(run_id)
            if hub is None:
                hub = RunHub(
                    self.redis, run_id, await last_seq(self.redis, run_id), block_ms=self._block_ms, batch=self._batch
                )
                await hub.start()
                self._hubs[run_id] = hub
                self._on_change(len(self._hubs))
            hub.clients += 1
            return hub

    def release(self, hub: RunHub) -> None:
        """One client of ``hub`` left; the last one stops it."""
        hub.clients -= 1
        if hub.clients > 0 or self._hubs.get(hub.run_id) is not hub:
            return
        del self._hubs[hub.run_id]
        self._on_change(len(self._hubs))
        task = asyncio.get_running_loop().create_task(hub.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def close(self) -> None:
        """Stop every hub (at shutdown): their clients' streams end and they reconnect elsewhere."""
        hubs, self._hubs = list(self._hubs.values()), {}
        await asyncio.gather(*(hub.stop() for hub in hubs), *self._stopping)
        self._on_change(0)


async def last_seq(redis: aioredis.Redis, run_id: str) -> int:
    """The ``seq`` of the run's newest event (0 when it has none)."""
    rows: Any = await redis.xrevrange(keys.events_key(run_id), max="+", min="-", count=1)
    return _event(run_id, rows[0][0], rows[0][1]).seq if rows else 0


async def read_events(redis: aioredis.Redis, run_id: str, after: int, until: int, count: int) -> list[Event]:
    """The run's events with ``after < seq <= until``, oldest first, at most ``count``."""
    rows: Any = await redis.xrange(keys.events_key(run_id), min=f"0-{after + 1}", max=f"0-{until}", count=count)
    return [_event(run_id, entry_id, fields) for entry_id, fields in rows]


async def run_exists(redis: aioredis.Redis, run_id: str) -> bool:
    """Whether the run exists (and has not expired)."""
    return bool(await redis.exists(keys.run_key(run_id)))


async def run_finished(redis: aioredis.Redis, run_id: str) -> bool:
    """Whether the run has ended (a run that expired meanwhile counts as ended)."""
    status = await redis.hget(keys.run_key(run_id), "status")
    return status is None or RunStatus(_text(status)).finished


async def nothing_more(redis: aioredis.Redis, run_id: str, after: int) -> bool:
    """Whether the run has ended and a client that saw up to ``after`` has seen all of it."""
    return await run_finished(redis, run_id) and await last_seq(redis, run_id) <= after


async def follow(
    redis: aioredis.Redis, run_id: str, after: int, subscription: Subscription
) -> AsyncIterator[Event | Delta]:
    """One client's events after ``after``, gapless and in order: replay from the stream, then live from the hub.

    Between the replay and the live events come the deltas: the text so far of every attempt streaming now, then
    live deltas, each cut to what the client does not have yet.

    Ends after the run's final event (when nothing newer is queued), or when the subscription closes; the caller
    reads ``subscription.dropped`` to tell a slow client to reconnect.
    """
    last = after
    ended: bool | None = None
    # Read right after subscribing, before the replay (which may take a while): a step that ends meanwhile would
    # take its text so far with it, and the deltas queued since the subscription would lack their beginning.
    so_far = await texts_so_far(redis, run_id)
    while last < subscription.position:
        batch = await read_events(redis, run_id, last, subscription.position, REPLAY_PAGE)
        if not batch:
            break  # trimmed away, or the run expired
        for event in batch:
            yield event
            last, ended = event.seq, ends_run(event)
    if ended is None:
        ended = await run_finished(redis, run_id)
    received = DeltaFilter()
    if not ended:
        for delta in so_far:
            received.sent(delta)
            yield delta
    while True:
        if ended and not subscription.pending:
            return
        live = await subscription.next()
        if live is None:
            return
        if isinstance(live, Delta):
            needed = received.cut(live)
            if needed is not None:
                yield needed
            continue
        if live.seq <= last:
            continue
        yield live
        last, ended = live.seq, ends_run(live)
