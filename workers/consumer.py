"""Celery's consumer, publishing the worker's buffered task events at most once per short window.

With an event loop, Celery buffers task events (``task-received``, ``task-started``, ``task-succeeded`` …) and
publishes what is buffered on the loop's next turn, which is about one event per publish: a third of a prefork
worker's time per step went there. Waiting :data:`EVENT_FLUSH_S` first lets one publish carry the events of that
window (Celery's grouped ``task.multi`` message, which Flower and every event receiver read), at the price of
Flower learning of a task up to that much later.
"""

from __future__ import annotations

import os
from typing import Any, cast

from celery.worker.consumer import Consumer

EVENT_FLUSH_S = 0.01
"""How long buffered task events wait to be published together."""


class BatchingConsumer(Consumer):
    """Celery's consumer, flushing buffered task events every :data:`EVENT_FLUSH_S` at most.

    The ``task-sent`` events of the messages its worker publishes (released steps, retries) join the same buffer
    (:attr:`orchestrator.celery_app.ShadowNamedAMQP.buffered_events`).
    """

    _flush_due = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pid = os.getpid()
        amqp = cast(Any, self).app.amqp
        if hasattr(amqp, "buffered_events"):
            amqp.buffered_events = self._buffered_events

    def _buffered_events(self) -> Any:
        # Only in this process: a prefork child has a copy of the consumer, without its event loop or connection.
        if os.getpid() != self._pid:
            return None
        # Set by Celery's Events bootstep, replaced at each reconnection; buffering only with an event loop.
        return getattr(self, "event_dispatcher", None)

    def on_send_event_buffered(self) -> Any:
        """Schedule one flush for the window instead of one per loop turn."""
        hub = cast(Any, self).hub  # Celery's type stubs do not declare the consumer's attributes
        if hub and not self._flush_due:
            self._flush_due = True
            hub.call_later(EVENT_FLUSH_S, self._flush_window)

    def _flush_window(self) -> None:
        self._flush_due = False
        cast(Any, self)._flush_events()
