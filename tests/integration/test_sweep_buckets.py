"""With ``ORCH_SHARDS=4`` the sweepers split the buckets of the global indices, each sweeping only the buckets it
holds; a stopped sweeper's buckets are taken over, and a lost step in every bucket is recovered by one of them.

Real Redis (a private one: no worker of another module sweeps it), a real producer app publishing real Celery
messages, and the sweep itself; no worker consumes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from orchestrator import Client, Settings
from orchestrator.celery_app import CeleryPublisher, create_app
from orchestrator.engine.priorities import redis_queue_lists
from orchestrator.engine.runtime import Runtime, build_runtime
from orchestrator.engine.sweep import sweep_once
from orchestrator.state import keys
from orchestrator.state.redis.owners import HOLD_INTERVALS
from tests.conftest import private_redis as start_private_redis
from tests.integration.helpers import wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SHARDS = 4
INTERVAL_S = 1.0
GRACE_S = 0.5
SPEC = workflow("swept_by_bucket", {"name": "a", "uses": "noop"})


@pytest.fixture
def settings() -> Iterator[Settings]:
    with start_private_redis() as server:
        yield Settings.from_env(
            {
                "REDIS_URL": server.url,
                "ORCH_SHARDS": str(SHARDS),
                "ORCH_SWEEP_INTERVAL_S": str(INTERVAL_S),
                "ORCH_QUEUED_GRACE_S": str(GRACE_S),
            }
        )


@pytest.fixture
def runtime(settings: Settings) -> Runtime:
    return build_runtime(settings, CeleryPublisher(create_app(settings), settings))


def split(runtime: Runtime) -> tuple[list[str | None], list[str | None]]:
    """Sweepers ``a`` and ``b`` take their turns until each holds its share; the buckets each then holds."""
    store = runtime.store
    store.sweep_buckets("a", INTERVAL_S)  # alone: takes every bucket
    assert store.sweep_buckets("b", INTERVAL_S) == []  # all held; b registers
    assert len(store.sweep_buckets("a", INTERVAL_S)) == SHARDS // 2  # two live: a keeps its share, frees the rest
    return store.sweep_buckets("a", INTERVAL_S), store.sweep_buckets("b", INTERVAL_S)


def test_two_sweepers_split_the_buckets_and_one_takes_over_when_the_other_stops(runtime: Runtime) -> None:
    held_by_a, held_by_b = split(runtime)
    assert len(held_by_a) == len(held_by_b) == SHARDS // 2
    assert sorted(map(str, held_by_a + held_by_b)) == sorted(map(str, keys.all_shards(SHARDS)))

    # b stops: once its hold and its entry among the live sweepers run out, a takes every bucket.
    taken = wait_for(
        lambda: len(runtime.store.sweep_buckets("a", INTERVAL_S)) == SHARDS,
        timeout=HOLD_INTERVALS * INTERVAL_S + 10,
        what="a to take over b's buckets",
    )
    assert taken


def test_a_lost_step_in_every_bucket_is_recovered_by_the_sweeper_holding_it(
    runtime: Runtime, settings: Settings
) -> None:
    client = Client(settings)
    runs: dict[str | None, str] = {}
    while len(runs) < SHARDS:
        run_id = client.submit(SPEC, {})
        runs.setdefault(keys.shard_of(run_id, SHARDS), run_id)
    raw = redis.Redis.from_url(settings.redis_url)
    # Every message was lost (taken by workers that died before claiming): the queues are empty.
    drain(raw, settings)
    wanted = {keys.lease_member(run_id, "a", "") for run_id in runs.values()}
    # The dispatch hold of each run's root is due after a grace (other runs, submitted meanwhile, may be due too).
    wait_for(
        lambda: wanted <= {m.rsplit("|", 1)[0] + "|" for m in runtime.store.expired_leases()},
        timeout=GRACE_S + 10,
        what="every root's hold to fall due",
    )

    held_by_a, held_by_b = split(runtime)
    due_by_a = runtime.store.expired_leases(buckets=held_by_a)
    due_by_b = runtime.store.expired_leases(buckets=held_by_b)
    assert due_by_a
    assert due_by_b
    assert not {keys.parse_lease_member(m)[0] for m in due_by_a} & {keys.parse_lease_member(m)[0] for m in due_by_b}

    # Each sweeper sends again the steps of its own buckets, under new task ids (the queue is drained in between, as
    # messages lost again: a message waiting in the queue would make the next sweeper hold its copies back a while).
    for owner, due in (("a", due_by_a), ("b", due_by_b)):
        assert sweep_once(runtime, owner) == len(due)
        assert drain(raw, settings) == len(due)
    assert set(runtime.store.expired_leases()) & set(due_by_a + due_by_b) == set()


def drain(raw: redis.Redis, settings: Settings) -> int:
    """Empty the step queue; how many messages it held."""
    lists = redis_queue_lists(settings.cpu_queue)
    pipe = raw.pipeline()
    for name in lists:
        pipe.llen(name)
    pipe.delete(*lists)
    return sum(pipe.execute()[:-1])
