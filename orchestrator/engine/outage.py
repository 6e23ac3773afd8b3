"""Waiting out a Redis or broker outage instead of stranding a step half way through a transition."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from orchestrator.errors import BrokerUnavailableError, StoreUnavailableError
from orchestrator.infra.redis_cluster import CLUSTER_ERRORS

log = logging.getLogger(__name__)

T = TypeVar("T")

OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    # A master demoted behind a proxy or a managed endpoint answers READONLY until the address moves to the new one.
    redis.exceptions.ReadOnlyError,
    # A Redis Cluster failing over: no master for a slot yet, or redirects that ran out before the map settled.
    *CLUSTER_ERRORS,
    BrokerUnavailableError,
)
"""Redis (the state store and the broker) not answering, or still loading its data after a restart."""
_LOGGED_AS_OUTAGE: tuple[type[Exception], ...] = (*OUTAGE_ERRORS, StoreUnavailableError)


class Doing:
    """What an attempt is doing, as an outage's log line names it ("ATTEMPT: claim"), spelt out only when one is
    written: formatting the attempt took more Python than the rest of a healthy claim."""

    __slots__ = ("attempt", "doing")

    def __init__(self, attempt: object, doing: str) -> None:
        self.attempt = attempt
        self.doing = doing

    def __str__(self) -> str:
        return f"{self.attempt}: {self.doing}"


def retry_through_outage(what: object, call: Callable[[], T], *, patience_s: float) -> T:
    """``call()``, repeated while Redis (or the broker) does not answer, for up to ``patience_s``; ``what`` names
    the call in the log line of each repeat (formatted with ``%s`` only then).

    A transition given up half way strands a step: a claim that fails leaves it queued with its message already
    taken, a publish that fails leaves released children with no message. Nothing can move while Redis is down
    anyway, so the attempt waits for it rather than lose its message. Every call repeated here is safe to repeat:
    the scripts check the attempt's generation and task id, so a repeat after a lost reply is refused, not applied
    twice (:func:`orchestrator.engine.attempt.finish_attempt` handles what that refusal can hide).

    Raises:
        redis.exceptions.ConnectionError: Or another of ``OUTAGE_ERRORS``, once ``patience_s`` has passed.
    """
    deadline = time.monotonic() + patience_s
    pause = 0.1
    while True:
        try:
            return call()
        except OUTAGE_ERRORS as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("%s: Redis does not answer (%s); trying again in %.1fs", what, exc, pause)
        time.sleep(pause)
        pause = min(pause * 2, 2.0)


class OutageLog:
    """Runs a repeated job (a sweep) and logs a Redis outage once when it starts and once when it ends.

    A job repeated every few seconds while Redis is down would otherwise log the same multi-frame traceback each
    time. Any other error is logged with its traceback every time, as before.

    Args:
        what: The job, for the log lines ("sweep").
        logger: Where the lines go.
        clock: Seconds, for the outage's duration.
    """

    def __init__(self, what: str, logger: logging.Logger = log, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self._log = logger
        self._clock = clock
        self._since: float | None = None

    @property
    def in_outage(self) -> bool:
        """Whether the last run of the job found Redis down."""
        return self._since is not None

    def run(self, job: Callable[[], object]) -> bool:
        """Run ``job`` once; returns whether it succeeded.

        The first failure for want of Redis logs one warning; the first success after it one info line with the
        outage's duration; the failures in between log nothing.
        """
        try:
            job()
        except _LOGGED_AS_OUTAGE as exc:
            if self._since is None:
                self._since = self._clock()
                self._log.warning(
                    "%s: Redis does not answer (%s: %s); trying again quietly until it does",
                    self.what,
                    type(exc).__name__,
                    exc,
                )
            return False
        except Exception:
            self._log.exception("%s failed", self.what)
            return False
        if self._since is not None:
            self._log.info("%s: Redis answers again after an outage of %.1fs", self.what, self._clock() - self._since)
            self._since = None
        return True
