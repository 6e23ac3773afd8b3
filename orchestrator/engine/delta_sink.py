"""Where a streaming attempt's deltas go: :class:`RedisDeltaSink`, one pipeline per process every ``COALESCE_S``.

Every streaming attempt of a worker process hands its coalesced deltas to the process's sink, which only queues them
(a list append under a lock: no Redis work on the thread that reads the SDK's stream). A daemon thread sends all the
queued deltas of all attempts every :data:`~orchestrator.engine.deltas.COALESCE_S`, in one pipeline, in order: for
each delta an ``APPEND`` to its attempt's text so far and a ``PUBLISH`` of its (small) JSON. With 200 attempts
streaming in a process that is one round trip per window instead of one per delta.

:meth:`RedisDeltaSink.finish` sends what is queued at once, on the caller's thread: every delta of an attempt is on
its channel before the attempt's end is told (a client's stream ends with the run's last event, so a delta sent after
it would be lost).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Protocol

import redis

from orchestrator.engine.deltas import COALESCE_S, MAX_TEXT_SO_FAR_CHARS, TEXT_TTL_S, Delta, attempt_member
from orchestrator.infra.redis_cluster import queue_publish
from orchestrator.state import keys

__all__ = ["DeltaSink", "RedisDeltaSink"]

log = logging.getLogger(__name__)

_Command = tuple[str, tuple[Any, ...]]


class DeltaSink(Protocol):
    """Where a streaming attempt's deltas go."""

    def publish(self, run_id: str, delta: Delta) -> None:
        """Send a delta (or a reset) to the run's watchers and keep the text so far."""

    def finish(self, run_id: str, step: str, index: int | None, attempt: int) -> None:
        """The attempt's call ended (either way): send what is pending and forget its text so far."""


class RedisDeltaSink:
    """Queues deltas and sends them in one pipeline per ``interval_s`` (see the module's docstring).

    A Redis failure loses the deltas of that window (logged), never the step: the final text is in the step's output
    regardless.

    Args:
        client: The state's Redis.
        max_text_chars: See :data:`~orchestrator.engine.deltas.MAX_TEXT_SO_FAR_CHARS`.
        ttl_s: See :data:`~orchestrator.engine.deltas.TEXT_TTL_S`.
        interval_s: How long a delta may wait in the queue (the sending thread's period).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        max_text_chars: int = MAX_TEXT_SO_FAR_CHARS,
        ttl_s: int = TEXT_TTL_S,
        interval_s: float = COALESCE_S,
    ) -> None:
        self.client = client
        self.max_text_chars = max_text_chars
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self._queue: list[_Command] = []
        self._queued = threading.Lock()
        self._sending = threading.Lock()
        self._wake = threading.Event()
        self._sender: threading.Thread | None = None
        self._pid = 0

    def publish(self, run_id: str, delta: Delta) -> None:
        """Queue the text so far's update (a reset empties it) and the delta's ``PUBLISH``; see :class:`DeltaSink`."""
        member = attempt_member(delta.step, delta.index, delta.attempt)
        text_key = keys.stream_text_key(run_id, member)
        commands: list[_Command] = []
        if delta.type == "llm_reset":
            commands.append(("delete", (text_key,)))
        elif delta.offset + len(delta.text) <= self.max_text_chars:
            commands.append(("append", (text_key, delta.text)))
            if delta.offset == 0:
                # Once per call: the TTL outlasts any call.
                texts_key = keys.stream_texts_key(run_id)
                commands += [("expire", (text_key, self.ttl_s)), ("sadd", (texts_key, member))]
                commands.append(("expire", (texts_key, self.ttl_s)))
        commands.append(("publish", (keys.deltas_channel(run_id), delta.encode())))
        with self._queued:
            self._queue += commands
        self._ensure_sender()
        if not self._wake.is_set():
            self._wake.set()

    def finish(self, run_id: str, step: str, index: int | None, attempt: int) -> None:
        """Send every queued delta now, then delete the attempt's text so far; see :class:`DeltaSink`."""
        member = attempt_member(step, index, attempt)
        with self._queued:
            self._queue += [
                ("delete", (keys.stream_text_key(run_id, member),)),
                ("srem", (keys.stream_texts_key(run_id), member)),
            ]
        self.flush()

    def flush(self) -> None:
        """Send what is queued, in order, in one pipeline (on the caller's thread)."""
        with self._sending:
            with self._queued:
                commands, self._queue = self._queue, []
            if not commands:
                return
            pipe = self.client.pipeline(transaction=False)
            for name, args in commands:
                if name == "publish":
                    queue_publish(pipe, *args)  # SPUBLISH in a cluster
                else:
                    getattr(pipe, name)(*args)
            try:
                pipe.execute()
            except redis.RedisError as exc:
                log.warning("could not publish streamed text (%d commands): %s", len(commands), exc)

    def _ensure_sender(self) -> None:
        # Started on first use in this process (a forked pool child starts its own).
        if self._sender is not None and self._pid == os.getpid():
            return
        with self._queued:
            if self._sender is not None and self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._sender = threading.Thread(target=self._send_forever, name="delta-sink", daemon=True)
            self._sender.start()

    def _send_forever(self) -> None:
        while True:
            self._wake.wait()  # idle until something is queued, then let the window fill
            time.sleep(self.interval_s)
            self._wake.clear()
            try:
                self.flush()
            except Exception:
                log.exception("the delta sink's sender failed; trying again")
