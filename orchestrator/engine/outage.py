"""Waiting out a Redis or broker outage instead of stranding a step half way through a transition."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from orchestrator.errors import BrokerUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    # A master demoted behind a proxy or a managed endpoint answers READONLY until the address moves to the new one.
    redis.exceptions.ReadOnlyError,
    BrokerUnavailableError,
)
"""Redis (the state store and the broker) not answering, or still loading its data after a restart."""


def retry_through_outage(what: str, call: Callable[[], T], *, patience_s: float) -> T:
    """``call()``, repeated while Redis (or the broker) does not answer, for up to ``patience_s``.

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
