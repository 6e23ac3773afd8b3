"""The global indices' buckets (``ORCH_SHARDS``): one bucket keeps the single-Redis names, more spread evenly over a
cluster's slots, and a run always lands in the same bucket."""

from __future__ import annotations

import collections
import uuid

import pytest
from redis.crc import key_slot

from orchestrator.state import keys


def test_one_shard_keeps_the_names_of_a_single_redis() -> None:
    assert keys.all_shards(1) == [None]
    assert keys.shard_of("any-run", 1) is None
    assert (keys.leases_key(None), keys.deadlines_key(None), keys.approvals_key(None)) == (
        keys.LEASES,
        keys.DEADLINES,
        keys.APPROVALS,
    )
    assert (keys.runs_index_key(None), keys.global_events_key(None), keys.sweeper_lock_key(None)) == (
        keys.RUNS_INDEX,
        keys.EVENTS,
        keys.SWEEPER_LOCK,
    )


@pytest.mark.parametrize("shards", [3, 6, 12, 16, 48])
def test_bucket_tags_fall_evenly_on_three_masters_with_equal_slot_ranges(shards: int) -> None:
    thirds = collections.Counter(
        key_slot(keys.leases_key(tag).encode()) * 3 // keys.SLOTS for tag in keys.all_shards(shards)
    )

    assert max(thirds.values()) - min(thirds.values()) <= 1
    assert len(thirds) == 3


def test_every_index_of_one_bucket_shares_its_slot() -> None:
    tag = keys.all_shards(12)[5]
    builders = (keys.leases_key, keys.deadlines_key, keys.approvals_key, keys.runs_index_key, keys.global_events_key)

    assert len({key_slot(build(tag).encode()) for build in builders}) == 1


def test_a_run_always_lands_in_the_same_bucket_and_runs_spread_over_all_of_them() -> None:
    runs = [uuid.uuid4().hex for _ in range(1200)]
    buckets = collections.Counter(keys.shard_of(run, 12) for run in runs)

    assert all(keys.shard_of(run, 12) == keys.shard_of(run, 12) for run in runs[:50])
    assert set(buckets) == set(keys.all_shards(12))
    assert min(buckets.values()) > 50
