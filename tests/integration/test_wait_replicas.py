"""``ORCH_WAIT_REPLICAS``: a claim and a finish wait until a replica has the run's writes, and read their own replies.

A private master and its replica (real ``redis-server`` processes); the store's transitions are called directly.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from orchestrator.definition.spec import parse_workflow
from orchestrator.dev.redis_server import RedisServer
from orchestrator.domain import Attempt, ClaimOutcome, StepOutcome
from orchestrator.state import RedisStateStore, keys
from tests.conftest import private_redis
from tests.integration.helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SPEC = parse_workflow({"name": "waited", "steps": [{"name": "a", "uses": "noop"}]})


@pytest.fixture
def master_and_replica() -> Iterator[tuple[redis.Redis, redis.Redis]]:
    with private_redis() as master:
        replica = RedisServer(extra_args=("--replicaof", "127.0.0.1", str(master.port)))
        replica.start()
        try:
            primary, copy = redis.Redis.from_url(master.url), redis.Redis.from_url(replica.url)
            wait_for(
                lambda: copy.info("replication")["master_link_status"] == "up", timeout=20, what="the replica in sync"
            )
            yield primary, copy
        finally:
            replica.stop()


def waits(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


def test_a_claim_and_a_finish_each_wait_for_the_replica(master_and_replica: tuple[redis.Redis, redis.Redis]) -> None:
    primary, copy = master_and_replica
    store = RedisStateStore(primary, wait_replicas=1)
    store.save_definition(SPEC)
    assert store.create_run("run1", SPEC, {}, None)
    attempt = Attempt("run1", "a", "1", "task-a")

    claim = store.claim(attempt, lease_s=60, upstream=(), children=())
    assert claim.outcome == ClaimOutcome.OK
    assert waits(primary) == 1
    result = store.finish(attempt, StepOutcome.SUCCEEDED, output={"x": 1})
    assert result.recorded
    assert result.run_status == "succeeded"
    assert waits(primary) == 2
    # WAIT returned once the replica had the finish: it holds the step's output already, no polling needed.
    assert copy.hget(keys.run_key("run1"), keys.step_field("a", "status")) == b"succeeded"


def test_without_the_setting_no_transition_waits(master_and_replica: tuple[redis.Redis, redis.Redis]) -> None:
    primary, _ = master_and_replica
    store = RedisStateStore(primary)
    store.save_definition(SPEC)
    assert store.create_run("run1", SPEC, {}, None)
    attempt = Attempt("run1", "a", "1", "task-a")
    assert store.claim(attempt, lease_s=60, upstream=(), children=()).outcome == ClaimOutcome.OK
    store.finish(attempt, StepOutcome.SUCCEEDED, output={"x": 1})
    assert waits(primary) == 0
