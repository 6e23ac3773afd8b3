"""The sweeper holds back copies of unclaimed steps while the step queues (any priority list) hold a backlog that
their messages could still be waiting in: one whose oldest message was sent before they were queued."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any, cast

import fakeredis
import pytest
import redis
from celery import Celery

from orchestrator import celery_app, parse_workflow
from orchestrator.engine.backlog import SENT_AT_HEADER
from orchestrator.engine.priorities import redis_queue_lists
from orchestrator.engine.runtime import Runtime
from orchestrator.engine.sweep import MAX_BACKLOG_GRACES, SENT_CLOCK_MARGIN_S, _backlog_wait_s
from orchestrator.infra.settings import Settings


def _runtime(broker: redis.Redis | None) -> Runtime:
    settings = Settings.from_env({"ORCH_QUEUED_GRACE_S": "30"})
    unused = cast(Any, None)
    return Runtime(settings, unused, unused, unused, unused, broker)


def test_empty_queues_let_a_lost_message_be_sent_again_at_once() -> None:
    assert _backlog_wait_s(_runtime(fakeredis.FakeRedis())) == 0.0


def test_a_message_waiting_in_any_priority_list_of_a_step_queue_holds_copies_back() -> None:
    for queue in ("llm", "cpu"):
        for name in redis_queue_lists(queue):
            broker = fakeredis.FakeRedis()
            broker.lpush(name, b"{}")
            assert _backlog_wait_s(_runtime(broker)) == MAX_BACKLOG_GRACES * 30.0, name


def test_a_broker_that_cannot_be_read_never_holds_copies_back() -> None:
    assert _backlog_wait_s(_runtime(None)) == 0.0
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    assert _backlog_wait_s(_runtime(unreachable)) == 0.0


def message(sent_at: float) -> bytes:
    return json.dumps({"body": "", "headers": {"id": "t", SENT_AT_HEADER: f"{sent_at:.3f}"}}).encode()


def test_only_steps_queued_before_the_oldest_waiting_message_was_sent_are_held_back() -> None:
    broker = fakeredis.FakeRedis()
    oldest = time.time() - 12.0
    broker.lpush("llm", message(oldest))
    broker.lpush("cpu", message(oldest + 5))
    broker.lpush("cpu", message(oldest + 10))  # newer, behind it: the list's oldest is what counts

    wait = _backlog_wait_s(_runtime(broker))

    # Held back while (now - queued_at) < wait: steps queued up to the margin after the oldest message was sent.
    assert 12.0 + SENT_CLOCK_MARGIN_S <= wait <= 12.0 + SENT_CLOCK_MARGIN_S + 1.0


def test_a_queue_that_turns_over_quickly_holds_back_only_steps_queued_moments_ago() -> None:
    broker = fakeredis.FakeRedis()
    broker.lpush("cpu", message(time.time()))
    assert SENT_CLOCK_MARGIN_S <= _backlog_wait_s(_runtime(broker)) <= SENT_CLOCK_MARGIN_S + 1.0


def test_a_backlog_holds_copies_back_for_eight_graces_at_most() -> None:
    broker = fakeredis.FakeRedis()
    broker.lpush("cpu", message(time.time() - 3600))
    assert _backlog_wait_s(_runtime(broker)) == MAX_BACKLOG_GRACES * 30.0


def test_every_message_of_a_maps_group_carries_the_time_its_publish_began(monkeypatch: pytest.MonkeyPatch) -> None:
    # Building and sending 10,000 item messages takes seconds: stamped one by one, the later ones looked sent long
    # after their items were queued, and once they were the oldest waiting the sweeper resent every item behind them.
    clock = iter(itertools.count(1_700_000_000.0, 1.0))  # each reading a second later
    monkeypatch.setattr(celery_app.time, "time", lambda: next(clock))
    sent: list[Any] = []
    monkeypatch.setattr(celery_app.CeleryPublisher, "_send", lambda self, messages: sent.extend(messages))
    spec = parse_workflow({"name": "map", "steps": [{"name": "m", "uses": "noop", "for_each": "inputs.xs"}]})
    publisher = celery_app.CeleryPublisher(Celery("t", set_as_current=False), Settings.from_env({}))

    publisher.publish_items(spec, run_id="r", step="m", generation="1", items=[(i, f"t.{i}") for i in range(50)])

    assert len(sent) == 50
    assert {s.options["headers"][SENT_AT_HEADER] for s in sent} == {"1700000000.000"}
