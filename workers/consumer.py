"""Celery's consumer, publishing the worker's buffered task events at most once per short window.

With an event loop, Celery buffers task events (``task-received``, ``task-started``, ``task-succeeded`` …) and
publishes what is buffered on the loop's next turn, which is about one event per publish: a third of a prefork
worker's time per step went there. Waiting :data:`EVENT_FLUSH_S` first lets one publish carry the events of that
window (Celery's grouped ``task.multi`` message, which Flower and every event receiver read), at the price of
Flower learning of a task up to that much later.

The first event of a window opens it on the loop's thread, waking the loop when a pool thread sent it: a timer
entered from a pool thread waits for the loop's poll to end (a second or more on a quiet worker), while the buffer
kept growing until Celery's size limit made the sending thread publish. Only the loop publishes: the limit is raised
to :data:`EVENT_BUFFER_LIMIT`, a safety valve for a loop that stopped turning, and a thread that finds it reached
while a publish is under way leaves the buffer to the next window instead of queueing behind that publish. What is
buffered when Celery replaces the dispatcher (a broker reconnection) or shuts down, which it would drop, is
published. :func:`buffer_task_events` adds events built elsewhere (the task events of locally run steps,
``workers/local.py``) to the same buffer.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, cast

from celery.events.dispatcher import EventDispatcher
from celery.events.event import Event
from celery.utils.time import utcoffset
from celery.worker.consumer import Consumer
from vine import promise

log = logging.getLogger(__name__)

EVENT_FLUSH_S = 0.01
"""How long buffered task events wait to be published together."""

EVENT_BUFFER_LIMIT = 20_000
"""Buffered task events at which the thread sending one publishes them itself, before their window ends: a few
megabytes, never reached while the loop turns.

Celery's default, 24, is a few steps' worth: on a busy threads worker most batches were then published by pool
threads. With 500, the llm worker of ``scripts/bench_load.py`` (500 threads) had over 200 of them waiting at once,
most of the time, on the dispatcher's lock: a batch stays in the buffer until its publish is done (Celery drops only
what it published), so while the loop published a large one every thread that sent an event found the buffer full
and queued behind it to publish the next few, each a round trip under the lock."""


class BatchingConsumer(Consumer):
    """Celery's consumer, flushing buffered task events every :data:`EVENT_FLUSH_S` at most.

    The ``task-sent`` events of the messages its worker publishes (released steps, retries) join the same buffer
    (:attr:`orchestrator.celery_app.ShadowNamedAMQP.buffered_events`).
    """

    _flush_due = False
    _dispatcher: EventDispatcher | None = None
    _closed: EventDispatcher | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open_window_promise = promise(self._open_window)
        super().__init__(*args, **kwargs)
        self._pid = os.getpid()
        amqp = cast(Any, self).app.amqp
        if hasattr(amqp, "buffered_events"):
            amqp.buffered_events = self._buffered_events

    @property
    def event_dispatcher(self) -> EventDispatcher | None:
        """The task-event dispatcher, set by Celery's Events bootstep (again at each reconnection), with a buffer of
        :data:`EVENT_BUFFER_LIMIT` events."""
        return self._dispatcher

    @event_dispatcher.setter
    def event_dispatcher(self, dispatcher: EventDispatcher | None) -> None:
        left: list[dict[str, Any]] = []
        if dispatcher is None:
            # Closed (a reconnection, or shutdown): the task events it still buffers go out with the next one.
            self._closed = self._dispatcher or self._closed
        else:
            target = cast(Any, dispatcher)  # Celery's type stubs leave out most of its attributes
            target.buffer_limit = EVENT_BUFFER_LIMIT
            if self._closed is not None:
                left = cast(Any, self._closed)._group_buffer.pop("task", None) or []
                self._closed = None
        self._dispatcher = dispatcher
        if left:
            cast(Any, dispatcher)._group_buffer["task"][:0] = left
            self.on_send_event_buffered()

    def _buffered_events(self) -> Any:
        # Only in this process: a prefork child has a copy of the consumer, without its event loop or connection.
        if os.getpid() != self._pid:
            return None
        # Buffering only with an event loop.
        return self._dispatcher

    def on_send_event_buffered(self) -> Any:
        """Open a window for the buffered events, unless one is open: one flush for the window instead of one per
        loop turn.

        From a pool thread this wakes the loop (``call_soon``), which then enters the window's timer itself.
        """
        hub = cast(Any, self).hub  # Celery's type stubs do not declare the consumer's attributes
        if hub and not self._flush_due:
            self._flush_due = True
            hub.call_soon(self._open_window_promise)

    def shutdown(self) -> None:
        """Publish the buffered events, then shut down as Celery does (which drops what is buffered).

        The worker has stopped its loop, then its pool: the events of the steps that ended in between wait for a
        window that never ends.
        """
        try:
            self._flush_window()
        except Exception:
            log.warning("task events buffered at shutdown were not published", exc_info=True)
        super().shutdown()

    def _open_window(self) -> None:
        cast(Any, self).hub.call_later(EVENT_FLUSH_S, self._flush_window)

    def _flush_window(self) -> None:
        # Cleared before the flush: an event buffered after it was taken opens the next window.
        self._flush_due = False
        cast(Any, self)._flush_events()


def buffer_task_events(dispatcher: EventDispatcher, *events: tuple[str, dict[str, Any]]) -> None:
    """Buffer ``events`` (type and fields) as ``dispatcher.send`` buffers task events, all at once.

    Each is stamped as ``send`` stamps it (``hostname``, ``utcoffset``, ``pid``, the app's Lamport ``clock``,
    ``timestamp`` and ``type``; one time for all of them), then all are added to the dispatcher's task buffer in one
    go, which is then flushed if full, or else its window opened (``on_send_buffered``): one check, one call, instead
    of one per event. The dispatcher must buffer the ``task`` group.
    """
    target = cast(Any, dispatcher)  # Celery's type stubs leave out most of its attributes
    if not target.enabled or (target.groups and "task" not in target.groups):
        return
    hostname, pid, forward = target.hostname, target.pid, target.clock.forward
    now, offset = time.time(), utcoffset()
    stamped = [
        Event(kind, fields, hostname=hostname, utcoffset=offset, pid=pid, clock=forward(), timestamp=now)
        for kind, fields in events
    ]
    # What send() appends each event to; a flush takes what it publishes off the front, so appending stays safe while
    # another thread flushes.
    buffered: list[dict[str, Any]] = target._group_buffer["task"]
    buffered.extend(stamped)
    if len(buffered) >= target.buffer_limit and not target.mutex.locked():
        # Unless a publish is under way (it holds the lock): the next window takes these.
        target.flush()
    elif target.on_send_buffered:
        target.on_send_buffered()
