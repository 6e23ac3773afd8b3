"""The workers' slots (``workers/slots.py``) and the clock they are stamped by (``orchestrator/state/redis/clock.py``):
what a fan-out reads is the live workers' concurrency, kept up by one ``ZADD`` every other sweep interval per worker
and read by one ``ZRANGE``, neither with a ``TIME`` of its own.

The batching decisions built on the sum are in ``test_engine_batches.py`` and ``tests/integration/test_batches.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from orchestrator.state import RedisStateStore, keys
from orchestrator.state.redis.clock import CLOCK_CHECK_S, RedisClock
from tests.conftest import private_redis
from tests.unit.test_state_contract import FakeClock
from workers import slots
from workers.slots import ALIVE_INTERVALS, ANNOUNCE_INTERVALS, FORGET_AFTER_S, KnownSlots, SlotsBeat, live_slots

INTERVAL_S = 5.0


@pytest.fixture(scope="module")
def slots_redis() -> Iterator[redis.Redis]:
    """A private redis-server: the session's own workers announce their slots in the shared one."""
    with private_redis() as server:
        client = redis.Redis.from_url(server.url)
        yield client
        client.close()


@pytest.fixture
def store(slots_redis: redis.Redis) -> RedisStateStore:
    slots_redis.flushdb()
    return RedisStateStore(slots_redis)


def commands(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the last ``CONFIG RESETSTAT``, the reset itself left out."""
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items() if k != "cmdstat_config|resetstat"}


def test_the_live_workers_slots_are_summed_and_a_lapsed_workers_are_not(store: RedisStateStore) -> None:
    slots.announce_slots(store, "celery@a", 4, 60.0)
    slots.announce_slots(store, "celery@b", 2, 60.0)
    slots.announce_slots(store, "celery@gone", 8, 0.2)
    assert live_slots(store) == 14

    deadline = time.monotonic() + 5.0
    while live_slots(store) != 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert live_slots(store) == 6, "the killed worker's 8 slots stop counting when its announcement runs out"


def test_a_worker_that_stops_withdraws_its_slots_at_once(store: RedisStateStore) -> None:
    beat = SlotsBeat("celery@a", 4, INTERVAL_S)
    beat.say(store)
    assert live_slots(store) == 4

    beat.withdraw(store)

    assert live_slots(store) == 0
    assert store.client.zcard(keys.WORKER_SLOTS) == 0


def test_a_worker_says_so_on_its_first_turn_then_every_other_interval_and_stays_counted_between(
    store: RedisStateStore,
) -> None:
    monotonic = FakeClock(0.0)
    beat = SlotsBeat("celery@a", 4, INTERVAL_S, clock=monotonic)
    said = []
    for _ in range(7):  # a turn every interval and a bit (the sweep itself takes time)
        said.append(beat.due())
        if said[-1]:
            beat.say(store)
        monotonic.advance(INTERVAL_S + 0.1)

    assert said == [True, False, True, False, True, False, True]
    until = store.client.zscore(keys.WORKER_SLOTS, slots.member("celery@a", 4))
    assert until is not None
    # Counted for twice as long as the worker takes to say so again: one late or failed turn costs nothing.
    assert ALIVE_INTERVALS * INTERVAL_S >= 2 * ANNOUNCE_INTERVALS * INTERVAL_S
    assert until - store.clock.read() == pytest.approx(ALIVE_INTERVALS * INTERVAL_S, abs=1.0)


def test_a_turn_after_a_failed_announcement_tries_again(
    store: RedisStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monotonic = FakeClock(0.0)
    beat = SlotsBeat("celery@a", 4, INTERVAL_S, clock=monotonic)

    def refused(*_: Any, **__: Any) -> None:
        raise redis.ConnectionError("Redis is away")

    monkeypatch.setattr(store.client, "zadd", refused)
    assert beat.due()
    with pytest.raises(redis.ConnectionError):
        beat.say(store)
    monkeypatch.undo()
    monotonic.advance(INTERVAL_S)

    assert beat.due(), "not two intervals later: the last turn said nothing"
    beat.say(store)
    assert live_slots(store) == 4
    assert not beat.due()


def test_announcing_and_reading_the_slots_send_no_time_of_their_own(store: RedisStateStore) -> None:
    store.clock.read()  # the process's offset from Redis's clock, read once a minute at most
    store.client.config_resetstat()

    SlotsBeat("celery@a", 4, INTERVAL_S).say(store)
    assert live_slots(store) == 4

    assert commands(store.client) == {"zadd": 1, "zrange": 1}


def test_a_reader_drops_the_entries_of_workers_gone_long_ago(store: RedisStateStore) -> None:
    now = store.clock.read()
    store.client.zadd(keys.WORKER_SLOTS, {"celery@old 8": now - FORGET_AFTER_S - 1, "celery@late 2": now - 1})
    slots.announce_slots(store, "celery@a", 4, 60.0)

    assert live_slots(store) == 4

    assert store.client.zrange(keys.WORKER_SLOTS, 0, -1) == [b"celery@late 2", b"celery@a 4"]


def test_a_fan_out_reads_the_slots_once_in_a_while_and_none_when_redis_is_away(store: RedisStateStore) -> None:
    slots.announce_slots(store, "celery@a", 4, 60.0)
    known = KnownSlots(lambda: store)
    assert known() == 4
    slots.announce_slots(store, "celery@b", 2, 60.0)
    assert known() == 4, "cached for SLOTS_CACHE_S"

    class Away:
        client = redis.Redis(port=1, socket_connect_timeout=0.2)

    assert KnownSlots(Away)() == 0  # type: ignore[arg-type]


def test_redis_time_is_read_once_a_minute_and_again_when_this_hosts_clock_is_stepped() -> None:
    class Redis:
        reads = 0

        def time(self) -> tuple[int, int]:
            Redis.reads += 1
            return 1_000_000, 500_000  # Redis's clock stands still here: only the offset moves

    local, monotonic = FakeClock(2_000_000.0), FakeClock(0.0)

    def elapse(seconds: float) -> None:
        local.advance(seconds)
        monotonic.advance(seconds)

    redis_clock = RedisClock(Redis(), wall=local, monotonic=monotonic)  # type: ignore[arg-type]

    assert redis_clock.now() == 1_000_000.5
    elapse(CLOCK_CHECK_S / 2)
    assert redis_clock.now() == 1_000_000.5 + CLOCK_CHECK_S / 2
    assert Redis.reads == 1
    elapse(CLOCK_CHECK_S / 2 + 1)
    assert redis_clock.now() == 1_000_000.5
    assert Redis.reads == 2

    for step in (-10.0, 10.0):  # set back, then forward (or resumed from suspend): the offset no longer holds
        local.advance(step)
        assert redis_clock.now() == 1_000_000.5
    assert Redis.reads == 4
