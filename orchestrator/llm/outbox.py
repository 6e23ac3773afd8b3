"""An attempt's LLM calls closed but not yet sent: settled in the round trip of the attempt's next write to Redis.

On a single Redis the gateway closes a call with one script (``close.lua``: the reply stored, the rate limit's
tokens settled or a cool-down started, the real cost charged to the run's budget in place of the worst case held).
Given an outbox (:attr:`~orchestrator.llm.gateway.CallContext.outbox`), the gateway leaves the close there instead
of sending it: the attempt's next write carries it ahead of its own commands, in its pipeline (see
:mod:`orchestrator.state.owed`). That write is the step's finish (or its retry, deferral or failure), or the next
call's admission when a step calls again (a structured-output repair, a loop's next iteration, an agent's next
turn): each call is settled before the next is admitted, so budgets and rate limits count exactly as when each close
took its own round trip. Whatever is left when the attempt ends is sent on its own (:meth:`CallOutbox.flush`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script

from orchestrator.infra.redis_cluster import queue_evalsha
from orchestrator.infra.redis_roundtrip import run_script
from orchestrator.state.owed import OwedWrite

__all__ = ["CallOutbox", "PendingClose"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingClose:
    """One call's close script, ready to send: on its own (:meth:`send`) or queued on a pipeline.

    Attributes:
        client: The Redis the governor governs with.
        script: ``close.lua`` as the governor registered it.
        keys: The script's keys.
        args: Its arguments.
        run_id: The run paying (for the log).
    """

    client: redis.Redis
    script: Script
    keys: Sequence[str]
    args: Sequence[Any]
    run_id: str

    def queue(self, pipe: Any) -> None:
        """Queue the close on ``pipe`` by ``EVALSHA``."""
        queue_evalsha(pipe, self.script.sha, len(self.keys), *self.keys, *self.args)

    def answered(self, reply: Any) -> None:
        """Take the queued close's reply: a script Redis forgot is sent again alone; an error is logged."""
        if isinstance(reply, redis.exceptions.NoScriptError):
            self.send()  # not applied: loaded and run again
        elif isinstance(reply, Exception):
            _lost(self.run_id, reply)

    def send(self) -> None:
        """Run the close on its own round trip; an error is logged, never raised (the reply is the step's)."""
        try:
            run_script(self.client, self.script, self.keys, self.args)
        except Exception as exc:
            _lost(self.run_id, exc)


def _lost(run_id: str, exc: BaseException) -> None:
    # The call has happened; losing its accounting or its stored reply must not lose the reply itself.
    log.warning("could not settle or store an LLM call of run %s", run_id, exc_info=exc)


class CallOutbox:
    """The closes one attempt's LLM calls left to send (see the module docstring); safe to share between threads."""

    def __init__(self) -> None:
        self._pending: list[PendingClose] = []
        self._lock = threading.Lock()

    def put(self, close: PendingClose) -> None:
        """Leave ``close`` for the attempt's next write to Redis."""
        with self._lock:
            self._pending.append(close)

    def take(self, client: object) -> list[OwedWrite]:
        """The closes owed to ``client`` (the same client object), now the caller's to send; see
        :meth:`orchestrator.state.owed.OwedWrites.take`."""
        with self._lock:
            pending, self._pending = self._pending, []
        for close in pending:
            if close.client is not client:
                close.send()
        return [close for close in pending if close.client is client]

    def flush(self) -> None:
        """Send every pending close now, each on its own round trip (never raises)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for close in pending:
            close.send()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)
