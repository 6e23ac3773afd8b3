"""The sweeper holds back copies of unclaimed steps while the step queues (any priority list) hold a backlog."""

from __future__ import annotations

from typing import Any, cast

import fakeredis
import redis

from orchestrator.engine.priorities import redis_queue_lists
from orchestrator.engine.runtime import Runtime
from orchestrator.engine.sweep import MAX_BACKLOG_GRACES, _backlog_wait_s
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
