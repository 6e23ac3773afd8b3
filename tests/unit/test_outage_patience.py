"""A step task waits out a Redis or broker outage for ``ORCH_OUTAGE_PATIENCE_S``, then gives up."""

from __future__ import annotations

import time

import pytest
import redis

from orchestrator.engine.outage import retry_through_outage
from orchestrator.infra.settings import Settings


def test_the_patience_is_a_setting_read_from_the_environment() -> None:
    assert Settings.from_env({}).outage_patience_s == 300.0
    assert Settings.from_env({"ORCH_OUTAGE_PATIENCE_S": "12.5"}).outage_patience_s == 12.5


def test_a_call_is_repeated_while_redis_does_not_answer_and_its_result_returned_once_it_does() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise redis.exceptions.ConnectionError("Connection refused")
        return "claimed"

    assert retry_through_outage("claim", flaky, patience_s=30) == "claimed"
    assert len(calls) == 3


def test_a_demoted_master_answering_readonly_counts_as_an_outage() -> None:
    calls: list[int] = []

    def demoted_then_promoted() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise redis.exceptions.ReadOnlyError("You can't write against a read only replica.")
        return "ok"

    assert retry_through_outage("finish", demoted_then_promoted, patience_s=30) == "ok"


def test_past_its_patience_the_outage_error_is_raised() -> None:
    started = time.monotonic()
    with pytest.raises(redis.exceptions.TimeoutError):
        retry_through_outage(
            "publish", lambda: (_ for _ in ()).throw(redis.exceptions.TimeoutError("timed out")), patience_s=0.3
        )
    assert time.monotonic() - started < 5


def test_an_error_that_is_not_an_outage_is_raised_at_once() -> None:
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise redis.exceptions.ResponseError("WRONGTYPE")

    with pytest.raises(redis.exceptions.ResponseError):
        retry_through_outage("claim", broken, patience_s=30)
    assert calls == [1]
