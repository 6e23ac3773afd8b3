"""An LLM call opened ahead: a child's gateway open sent in its parent's finish round trip.

When a finishing step keeps an ``llm`` child to run in its own worker (:mod:`orchestrator.engine.local`), the
child's first call is known before the finish is sent: its prompt renders from the run's inputs and the finishing
step's output. The parent then queues the child's open (``open.lua``: reply cache, cool-down, rate limit, budget hold)
right after ``finish.lua`` in the finish's pipeline, guarded by the claim the finish makes: a child the finish did
not claim (under the task id it was to be claimed with) is not opened at all. The child's call then takes the
answer instead of opening again, one round trip fewer per local hop.

The call the child really makes decides: the gateway takes the answer only when the request and the caller's fields
that decide the open (:attr:`Foretold.fits`) are the very ones opened ahead (:meth:`PreOpen.take`); the prediction can
only cost a round trip, never change an answer. What the open was worked out from travels with it (:class:`Foretold`):
a child that sees what its parent foresaw (:attr:`Foretold.basis`) neither renders its prompt nor prices it again.

An admission the child does not take (another request, a resumed step that needs no call, an attempt that stops
first) is given back as the budget refusal gives one back: the worst case held is released and the request and tokens
go back to the rate limit (:meth:`PreOpen.give_back`). An open ahead never books a place in a rate limit: a child
told to wait opens again itself, and books then.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script

from orchestrator.infra.redis_cluster import queue_evalsha
from orchestrator.llm.base import LLMRequest
from orchestrator.llm.outbox import PendingClose
from orchestrator.state.owed import Overtaken

__all__ = ["HOLDING", "RESERVE_ARG", "Foretold", "PreOpen"]

log = logging.getLogger(__name__)

RESERVE_ARG = 6
"""The position of ``open.lua``'s reserve flag in its arguments: ``0`` in an open ahead, whatever the call's."""

HOLDING = "ok"
"""The only answer that holds something (a request, tokens, the worst case) until it is closed or given back."""

_USED = frozenset({"ok", "cached", "cooldown", "budget_exceeded"})


@dataclass(frozen=True)
class Foretold:
    """What a call opened ahead was worked out from, so the call that fits it need not work it out again.

    Attributes:
        request: The request, as the child's attempt is foreseen to send it (its ``timeout_s`` the default).
        fits: The request's and the caller's fields that decide the open (see ``LLMGateway``): a call with these
            same ones opens exactly this.
        digest: The request's digest.
        plan: The gateway's reply store, tokens and worst case for it.
        basis: What the request was rendered from (the step's context), for the step to tell it sees the same.
    """

    request: LLMRequest
    fits: tuple[Any, ...]
    digest: str
    plan: tuple[Any, int, float]
    basis: Any = None


class PreOpen:
    """One child's open, queued on its parent's finish pipeline, and then its answer until the child takes it.

    Args:
        client: The Redis the governor governs with (the finish's own, or it is not sent: :attr:`client`).
        script: ``open.lua`` as the governor registered it.
        keys: The open's keys.
        args: Its arguments (the reserve flag ``0``), without the guard.
        guard: The child's status field, its task field, and the task id the finish claims it under.
        give_back: Builds the close that gives an ``ok`` admission back whole.
        run_id: The run paying (for the log).
        foretold: What it was worked out from.
    """

    def __init__(
        self,
        client: redis.Redis,
        script: Script,
        *,
        keys: Sequence[str],
        args: Sequence[Any],
        guard: tuple[str, str, str],
        give_back: Callable[[], PendingClose],
        run_id: str,
        foretold: Foretold,
    ) -> None:
        self.client = client
        self._script = script
        self._keys = tuple(keys)
        self._args = tuple(args)
        self._guard = guard
        self._give_back = give_back
        self._run_id = run_id
        self.foretold = foretold
        self._answer: list[Any] | None = None
        self._lock = threading.Lock()

    def queue(self, pipe: Any) -> None:
        """Queue the open on ``pipe`` by ``EVALSHA``, after the finish that claims the child."""
        queue_evalsha(pipe, self._script.sha, len(self._keys), *self._keys, *self._args, *self._guard)

    def answered(self, reply: Any) -> None:
        """Take the open's reply; a child not claimed, a script Redis forgot or an error leave nothing to take.

        An open applied ahead of a close the finish owed (:class:`~orchestrator.state.owed.Overtaken`: Redis did not
        know the close's script and it went after) did not see that call settled nor its reply stored: it is given
        back at once, and the child opens its call itself.
        """
        if isinstance(reply, Overtaken):
            if _held(reply.reply):
                self._give_back().send()
            log.info("an LLM call of run %s opened ahead of an earlier call's close: given back", self._run_id)
        elif isinstance(reply, list | tuple) and reply and _text(reply[0]) in _USED:
            with self._lock:
                self._answer = list(reply)
        elif isinstance(reply, Exception):
            log.info("an LLM call of run %s was not opened ahead: %s", self._run_id, reply)

    @property
    def holds(self) -> bool:
        """Whether an admission is held for the child and not taken yet."""
        with self._lock:
            return _held(self._answer)

    def take(self, fits: tuple[Any, ...]) -> list[Any] | None:
        """The answer, once, when ``fits`` are those it was opened for (:attr:`Foretold.fits`); else ``None`` and the
        answer stays, for :meth:`give_back`."""
        with self._lock:
            if self._answer is None or fits != self.foretold.fits:
                return None
            answer, self._answer = self._answer, None
            return answer

    def give_back(self) -> PendingClose | None:
        """The close that gives back an admission not taken (``None`` when nothing is held); at most once."""
        with self._lock:
            answer, self._answer = self._answer, None
        return self._give_back() if _held(answer) else None


def _held(answer: Any) -> bool:
    return isinstance(answer, list | tuple) and bool(answer) and _text(answer[0]) == HOLDING


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
