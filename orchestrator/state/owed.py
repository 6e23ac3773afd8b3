"""Writes an attempt owes Redis besides its own transitions, sent ahead of its next transition in its round trip.

An LLM call's settlement (:class:`~orchestrator.llm.outbox.CallOutbox`: the call's cost charged to the run's budget,
its unused tokens given back to the rate limit, a cool-down, the reply stored) is known the moment the provider
answers, but nothing in the attempt needs it applied before the attempt's next write to Redis: a step's finish, a
retry or deferral, or the next LLM call's admission. The attempt hands such writes to the store's transition, which
queues them first on its own pipeline: Redis applies them before the transition, and the two share one round trip.

A write is sent at most once, as it was on its own: taken out of its outbox when queued, its reply handed back to it
(an error is its own, never the transition's).

Redis applies a round trip in order, with one exception: an owed write by a script Redis does not know (``NOSCRIPT``:
first use since a restart or ``SCRIPT FLUSH``) is not applied and is sent again alone, after everything its round
trip held (:func:`sent_again`). A write queued after it that depends on it (an LLM call's open, which must see the
call before it settled and its reply stored) then learns it came first (:class:`Overtaken`) and makes up for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis

__all__ = ["OwedWrite", "OwedWrites", "Overtaken", "sent_again"]


class OwedWrite(Protocol):
    """One write owed to a Redis, queued on a transition's pipeline."""

    def queue(self, pipe: Any) -> None:
        """Queue the write on ``pipe``, a plain (non-transactional) pipeline of the write's own Redis."""
        ...

    def answered(self, reply: Any) -> None:
        """Take the write's reply (an exception for an error reply); never raises.

        A script Redis no longer knows (``NOSCRIPT``: first use since a restart or ``SCRIPT FLUSH``) was not applied:
        it is loaded and the write sent again, alone.
        """
        ...


class OwedWrites(Protocol):
    """An attempt's owed writes, for its next transition to send ahead of its own commands."""

    def take(self, client: object) -> list[OwedWrite]:
        """The writes owed to ``client``'s Redis, now the caller's to queue and answer (once).

        Writes owed to another Redis are sent first, on their own: only the caller's Redis can take them in its
        round trip.
        """
        ...

    def flush(self) -> None:
        """Send every owed write now, on its own round trip (never raises)."""
        ...


@dataclass(frozen=True)
class Overtaken:
    """The reply of a write Redis applied ahead of an owed write it had to send again (:func:`sent_again`): what the
    write saw lacks that owed write's effect.

    Attributes:
        reply: The write's own reply.
    """

    reply: Any


def sent_again(replies: Sequence[Any]) -> bool:
    """Whether any of these owed writes' ``replies`` says Redis did not know its script: that write was not applied,
    and is sent again once the whole round trip has been applied (see :meth:`OwedWrite.answered`)."""
    return any(isinstance(reply, redis.exceptions.NoScriptError) for reply in replies)
