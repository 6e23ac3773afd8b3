"""The load benchmark's follower of run ends (``scripts.harness.runs.RunEnds``): the global stream's announcements."""

from __future__ import annotations

import pytest
import redis

from orchestrator.state.redis import RedisStateStore
from scripts.harness.runs import RunEnds

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def store(redis_url: str) -> RedisStateStore:
    return RedisStateStore(redis.Redis.from_url(redis_url), retention_s=60, shards=2)


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


def test_it_reports_the_runs_whose_end_was_announced_since_it_was_made(
    store: RedisStateStore, client: redis.Redis
) -> None:
    store.announce("ended-before", "run_succeeded", "wf")
    ends = RunEnds(client, shards=2)
    for run_id, event in [
        ("a", "run_started"),
        ("a", "run_succeeded"),
        ("b", "run_failed"),
        ("c", "run_timed_out"),
        ("d", "run_cancelled"),
        ("e", "run_started"),
        ("f", "run_resumed"),
    ]:
        store.announce(run_id, event, "wf")

    assert ends.poll() == {"a", "b", "c", "d"}
    assert ends.poll() == set()

    store.announce("e", "run_succeeded", "wf")

    assert ends.poll() == {"e"}
    assert ends.ended == {"a", "b", "c", "d", "e"}


def test_a_poll_reads_on_while_a_read_comes_back_full(
    store: RedisStateStore, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    ends = RunEnds(client, shards=2)
    monkeypatch.setattr(RunEnds, "READ_COUNT", 2)
    run_ids = {f"run-{i}" for i in range(9)}
    for run_id in sorted(run_ids):
        store.announce(run_id, "run_succeeded", "wf")

    assert ends.poll() == run_ids
    assert ends.commands > 2 + 5  # the two buckets' starting points, then at least five reads of two
