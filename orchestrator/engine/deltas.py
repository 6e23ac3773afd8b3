"""Streamed LLM text: coalesced ``llm_delta`` events on a run's pub/sub channel, and the text so far per attempt.

::

    SDK text deltas ──▶ TextStream (coalesces, ~every COALESCE_S) ──▶ DeltaSink.publish ─┬─ APPEND orch:{RUN}:text:…
                                                                                        └─ PUBLISH orch:{RUN}:deltas

Deltas are not progress events: they have no ``seq`` and never enter the run's durable event stream. A client that
joins late first gets the text so far of each streaming attempt (one ``llm_delta``), then the live ones; each delta
carries its ``offset`` in the attempt's text on the channel, so the API can drop what the text so far already held.
A retried attempt (or a repeated step's next iteration, a structured-output repair call, or an agent's turn after
one that streamed text) starts with an ``llm_reset``: what was streamed before it is not part of the final text.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, Protocol

import redis

from orchestrator.infra.redis_cluster import queue_publish
from orchestrator.state import keys

__all__ = [
    "AttemptStream",
    "COALESCE_S",
    "MAX_TEXT_SO_FAR_CHARS",
    "TEXT_TTL_S",
    "Delta",
    "DeltaSink",
    "RedisDeltaSink",
    "TextStream",
    "DeltaFilter",
    "attempt_member",
    "parse_member",
    "texts_as_deltas",
    "texts_so_far",
]

log = logging.getLogger(__name__)

COALESCE_S: Final = 0.05
"""A streaming attempt publishes at most one delta per this many seconds (plus its last one)."""

MAX_TEXT_SO_FAR_CHARS: Final = 512_000
"""The text so far kept for late clients stops growing here (deltas still flow; a late client misses the gap)."""

TEXT_TTL_S: Final = 3600
"""The text so far expires this long after its first delta, should its attempt never finish (a killed worker)."""

DeltaType = Literal["llm_delta", "llm_reset"]


@dataclass(frozen=True)
class Delta:
    """A piece of a step attempt's streamed text (``llm_delta``), or the news that its text starts over (``llm_reset``).

    Attributes:
        type: ``llm_delta`` or ``llm_reset``.
        step: The step.
        index: A map step's item index, else ``None``.
        attempt: The step's attempt number.
        text: The new text (empty for a reset).
        offset: Where ``text`` starts in the attempt's text (for the API's de-duplication; not sent to clients).
    """

    type: DeltaType
    step: str
    index: int | None
    attempt: int
    text: str = ""
    offset: int = 0

    def to_json(self) -> dict[str, Any]:
        """The wire form: ``{step, index, attempt, text}`` (a reset has no ``text``)."""
        body: dict[str, Any] = {"step": self.step, "index": self.index, "attempt": self.attempt}
        if self.type == "llm_delta":
            body["text"] = self.text
        return body

    def encode(self) -> str:
        """The pub/sub message: the wire form plus ``type`` and ``offset``."""
        return json.dumps({"type": self.type, **self.to_json(), "offset": self.offset}, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | bytes) -> Delta | None:
        """Read a pub/sub message; ``None`` when it is not one :meth:`encode` wrote."""
        try:
            body = json.loads(raw)
            kind = body["type"]
            if kind not in ("llm_delta", "llm_reset"):
                return None
            index = body.get("index")
            return cls(
                kind,
                str(body["step"]),
                None if index is None else int(index),
                int(body["attempt"]),
                str(body.get("text", "")),
                int(body.get("offset", 0)),
            )
        except (ValueError, KeyError, TypeError):
            return None


def attempt_member(step: str, index: int | None, attempt: int) -> str:
    """How a streaming attempt is named in :func:`~orchestrator.state.keys.stream_texts_key`."""
    return f"{step}|{'-' if index is None else index}|{attempt}"


def parse_member(member: str) -> tuple[str, int | None, int]:
    """The step, index and attempt an :func:`attempt_member` names."""
    step, index, attempt = member.rsplit("|", 2)
    return step, None if index == "-" else int(index), int(attempt)


class DeltaFilter:
    """Remembers how much of each attempt's text a client has, and cuts live deltas to what it does not."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, int | None, int], int] = {}

    def sent(self, delta: Delta) -> None:
        """The client got ``delta`` (a text so far, or a live one)."""
        self._held[(delta.step, delta.index, delta.attempt)] = delta.offset + len(delta.text)

    def cut(self, delta: Delta) -> Delta | None:
        """What of ``delta`` the client still needs (``None``: nothing); a reset starts its attempt's text over."""
        key = (delta.step, delta.index, delta.attempt)
        if delta.type == "llm_reset":
            self._held[key] = 0
            return delta
        held = self._held.get(key, 0)
        end = delta.offset + len(delta.text)
        if end <= held:
            return None
        if delta.offset < held:
            delta = replace(delta, text=delta.text[held - delta.offset :], offset=held)
        self._held[key] = end
        return delta


def texts_as_deltas(members: list[str], texts: list[str | None]) -> list[Delta]:
    """One ``llm_delta`` per streaming attempt (``members`` of the run's texts set) holding its text so far."""
    return [
        Delta("llm_delta", *parse_member(member), text) for member, text in zip(members, texts, strict=True) if text
    ]


def texts_so_far(client: redis.Redis, run_id: str) -> list[Delta]:
    """The text so far of every step attempt of the run streaming now (see :func:`texts_as_deltas`)."""
    members = sorted(_text(member) for member in client.smembers(keys.stream_texts_key(run_id)))
    if not members:
        return []
    texts = client.mget([keys.stream_text_key(run_id, member) for member in members])
    return texts_as_deltas(members, [None if text is None else _text(text) for text in texts])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class DeltaSink(Protocol):
    """Where a streaming attempt's deltas go."""

    def publish(self, run_id: str, delta: Delta) -> None:
        """Send a delta (or a reset) to the run's watchers and keep the text so far."""

    def finish(self, run_id: str, step: str, index: int | None, attempt: int) -> None:
        """The attempt's call ended (either way): forget its text so far."""


class RedisDeltaSink:
    """Publishes deltas on the run's channel and APPENDs them to the attempt's text so far, in one round trip.

    A Redis failure loses deltas (logged), never the step: the final text is in the step's output regardless.

    Args:
        client: The state's Redis.
        max_text_chars: See :data:`MAX_TEXT_SO_FAR_CHARS`.
        ttl_s: See :data:`TEXT_TTL_S`.
    """

    def __init__(
        self, client: redis.Redis, *, max_text_chars: int = MAX_TEXT_SO_FAR_CHARS, ttl_s: int = TEXT_TTL_S
    ) -> None:
        self.client = client
        self.max_text_chars = max_text_chars
        self.ttl_s = ttl_s

    def publish(self, run_id: str, delta: Delta) -> None:
        """Keep the text so far (a reset empties it), then publish; see :meth:`DeltaSink.publish`."""
        member = attempt_member(delta.step, delta.index, delta.attempt)
        text_key, texts_key = keys.stream_text_key(run_id, member), keys.stream_texts_key(run_id)
        pipe = self.client.pipeline(transaction=False)
        if delta.type == "llm_reset":
            pipe.delete(text_key)
        elif delta.offset + len(delta.text) <= self.max_text_chars:
            pipe.append(text_key, delta.text)
            if delta.offset == 0:
                # Once per call: the TTL outlasts any call, and three commands fewer per delta halve its cost.
                pipe.expire(text_key, self.ttl_s)
                pipe.sadd(texts_key, member)
                pipe.expire(texts_key, self.ttl_s)
        queue_publish(pipe, keys.deltas_channel(run_id), delta.encode())
        self._execute(pipe, run_id)

    def finish(self, run_id: str, step: str, index: int | None, attempt: int) -> None:
        """Delete the attempt's text so far; see :meth:`DeltaSink.finish`."""
        member = attempt_member(step, index, attempt)
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(keys.stream_text_key(run_id, member))
        pipe.srem(keys.stream_texts_key(run_id), member)
        self._execute(pipe, run_id)

    @staticmethod
    def _execute(pipe: Any, run_id: str) -> None:
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not publish streamed text of run %s: %s", run_id, exc)


class TextStream:
    """One streaming call's text, coalesced into deltas: the ``on_text`` callback a provider call is given.

    The first piece goes out at once (time to first token matters to a watcher); later ones wait until
    ``interval_s`` has passed since the last delta, and :meth:`close` sends what is left. Pieces arrive on the
    calling thread only, so no lock is needed.

    Args:
        emit: Receives each coalesced delta's text and its offset in the attempt's text.
        interval_s: See :data:`COALESCE_S`.
        clock: Monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        emit: Callable[[str, int], None],
        *,
        interval_s: float = COALESCE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emit = emit
        self._interval_s = interval_s
        self._clock = clock
        self._pending: list[str] = []
        self._offset = 0
        self._last = -float("inf")

    def __call__(self, text: str) -> None:
        """Take one piece of text; publish the pieces held so far when the interval has passed."""
        if not text:
            return
        self._pending.append(text)
        if self._clock() - self._last >= self._interval_s:
            self.flush()

    @property
    def sent(self) -> int:
        """Characters published so far."""
        return self._offset

    def flush(self) -> None:
        """Publish the pieces held, as one delta."""
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._emit(text, self._offset)
        self._offset += len(text)
        self._last = self._clock()

    def restart(self) -> None:
        """Forget what was sent: the next piece starts the text again (after an ``llm_reset``)."""
        self._pending.clear()
        self._offset = 0
        self._last = -float("inf")


class AttemptStream:
    """A step attempt's streamed text: a :class:`TextStream` bound to a :class:`DeltaSink` and the attempt's names.

    Use as a context manager around the provider calls, passing :attr:`on_text` to each; a retried attempt (or a
    repeated step's later iteration) announces an ``llm_reset`` when it opens, as does :meth:`reset` before a second
    call in the same attempt. On exit the remaining text is sent and the text so far is forgotten.

    Args:
        sink: Where deltas go.
        run_id: The run.
        step: The step.
        index: A map step's item index, else ``None``.
        attempt: The attempt number.
        starts_over: Announce an ``llm_reset`` before the first delta (an earlier attempt or iteration streamed).
    """

    def __init__(
        self,
        sink: DeltaSink,
        run_id: str,
        step: str,
        index: int | None,
        attempt: int,
        *,
        starts_over: bool = False,
        interval_s: float = COALESCE_S,
    ) -> None:
        self.sink = sink
        self.run_id = run_id
        self.step, self.index, self.attempt = step, index, attempt
        self.text = TextStream(self._emit, interval_s=interval_s)
        self._starts_over = starts_over

    def on_text(self, text: str) -> None:
        """The callback a provider call streams into."""
        self.text(text)

    def reset(self) -> None:
        """Start the text again: what was streamed so far is not part of the final text (a no-op when nothing was)."""
        self.text.flush()
        if self.text.sent:
            self.text.restart()
            self._starts_over = True

    def __enter__(self) -> AttemptStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.text.flush()
        self.sink.finish(self.run_id, self.step, self.index, self.attempt)

    def _emit(self, text: str, offset: int) -> None:
        if self._starts_over:
            self._starts_over = False
            self.sink.publish(self.run_id, Delta("llm_reset", self.step, self.index, self.attempt))
        self.sink.publish(self.run_id, Delta("llm_delta", self.step, self.index, self.attempt, text, offset))
