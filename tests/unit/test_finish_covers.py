"""On a single Redis a finish covers the steps it releases in the lease index itself, in its one round trip.

A step with several parents is released by the last of them only. Covering it before the script for every parent
(as a cluster must, its lease index on another slot) costs each parent that does not release it a second round trip
to take the cover back. Against a real Redis, every command the worker sends is recorded with its arguments.
"""

from __future__ import annotations

import time

import pytest
import redis

from orchestrator.engine.runtime import Runtime, build_runtime
from orchestrator.state import RedisStateStore, keys
from tests.unit.round_trips import RoundTrips, record_round_trips
from tests.unit.test_engine_attempt import SETTINGS, RecordingPublisher, deliver, start, workflow

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> RoundTrips:
    return record_round_trips(monkeypatch)


@pytest.fixture
def runtime(redis_url: str) -> tuple[Runtime, RecordingPublisher, RedisStateStore]:
    store = RedisStateStore(redis.Redis.from_url(redis_url), retention_s=60)
    publisher = RecordingPublisher()
    built = build_runtime(SETTINGS, publisher, store=store)
    for script in store._scripts.values():  # known already, as in a worker that has run steps before
        store.client.script_load(script.script)
    return built, publisher, store


def covers(store: RedisStateStore, run_id: str, step: str) -> dict[str, float]:
    """The lease index's entries for ``step`` of ``run_id``: task id → due."""
    rows = store.client.zrange(keys.leases_key(None), 0, -1, withscores=True)
    found = {}
    for member, score in rows:
        run, name, task = keys.parse_lease_member(member.decode())
        if (run, name) == (run_id, step):
            found[task] = score
    return found


def test_a_parent_that_does_not_release_its_child_sends_nothing_after_its_finish_and_covers_nothing(
    runtime: tuple[Runtime, RecordingPublisher, RedisStateStore], commands: RoundTrips
) -> None:
    rt, publisher, store = runtime
    spec = workflow(
        {"name": "a", "uses": "noop"},
        {"name": "b", "uses": "noop"},
        {"name": "c", "uses": "noop", "depends_on": ["a", "b"]},
    )
    run_id = start(rt, publisher, spec)
    first, second = publisher.sent.pop(0), publisher.sent.pop(0)
    commands.trips.clear()

    deliver(rt, first)

    assert commands.after(store._scripts["finish"].sha) == [], "no cover to take back"
    assert covers(store, run_id, "c") == {}
    assert publisher.sent == []

    before = time.time()
    deliver(rt, second)

    (message,) = publisher.sent
    assert message.step == "c"
    (task, due), *_ = covers(store, run_id, "c").items()
    assert task == message.task_id, "covered under the task id its message carries"
    assert before + SETTINGS.queued_grace_s - 1 <= due <= time.time() + SETTINGS.queued_grace_s
    assert covers(store, run_id, "a") == covers(store, run_id, "b") == {}, "the parents left the index"
