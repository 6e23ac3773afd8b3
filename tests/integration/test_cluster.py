"""State in a real Redis Cluster: six ``redis-server`` processes on loopback (3 masters, 3 replicas), a plain Redis as
the broker (``ORCH_BROKER_URL``), real worker processes and the real API.

Checked: a workflow runs with its run on one slot and the global indices split over the masters (``ORCH_SHARDS``);
the API serves status, the event stream and streamed text (sharded pub/sub) through the cluster; SIGKILL of a master
with 50 runs in flight (its replica promoted): every run succeeds, none is lost, no step runs twice.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import httpx
import pytest
import redis

from orchestrator import Client, Settings
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.dev.redis_cluster import RedisClusterServers
from orchestrator.dev.redis_server import RedisServer
from orchestrator.errors import StoreUnavailableError
from orchestrator.state import RedisStateStore, keys
from tests.conftest import ARTIFACTS, IN_CI, WORKER_ENV, private_redis
from tests.integration.helpers import py, wait_for, workflow
from tests.integration.test_api import ADMIN, ApiServer, bearer, finished
from tests.integration.test_streaming import deltas_of, frames, streaming

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SHARDS = 6
WORKERS, CONCURRENCY = 2, 4
LOG_DIR = ARTIFACTS / "worker-logs"


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers()
    try:
        servers.start()
    except StoreUnavailableError as exc:
        if IN_CI:
            pytest.fail(f"no Redis Cluster (CI=true: the cluster tests must run): {exc}")
        pytest.skip(str(exc))
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="module")
def broker() -> Iterator[RedisServer]:
    with private_redis() as server:
        yield server


@pytest.fixture(scope="module")
def env(cluster: RedisClusterServers, broker: RedisServer) -> dict[str, str]:
    return {**WORKER_ENV, "REDIS_URL": cluster.url, "ORCH_BROKER_URL": broker.url, "ORCH_SHARDS": str(SHARDS)}


@pytest.fixture(scope="module")
def client(env: dict[str, str]) -> Client:
    return Client(Settings.from_env(env))


@pytest.fixture(scope="module")
def cluster_workers(client: Client, env: dict[str, str]) -> Iterator[LocalWorkers]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    pool = LocalWorkers(client.app, count=WORKERS, concurrency=CONCURRENCY, env=env, log_dir=LOG_DIR)
    # Six Redis nodes and eight pool processes on two busy cores: starting may take a while.
    pool.start(timeout=180)
    try:
        yield pool
    finally:
        pool.stop()


def _node(port: int) -> redis.Redis:
    return redis.Redis(port=port, decode_responses=True, socket_timeout=5)


def test_two_sweepers_split_the_buckets_over_the_masters_and_one_takes_over_the_others(
    cluster: RedisClusterServers,
) -> None:
    # First in the module: no worker runs yet, so a and b are the only sweepers.
    store = RedisStateStore.from_url(cluster.url, shards=SHARDS)
    interval_s = 1.0
    store.sweep_buckets("a", interval_s)
    store.sweep_buckets("b", interval_s)
    store.sweep_buckets("a", interval_s)  # two live: a frees what it holds beyond its share
    held_by_a, held_by_b = store.sweep_buckets("a", interval_s), store.sweep_buckets("b", interval_s)
    assert len(held_by_a) == len(held_by_b) == SHARDS // 2
    assert sorted(map(str, held_by_a + held_by_b)) == sorted(map(str, keys.all_shards(SHARDS)))
    # The bucket tags lie in equal slot ranges, so each sweeper's buckets sit on more than one master.
    masters = {cluster.master_of(keys.leases_key(shard)).port for shard in held_by_a}
    assert len(masters) > 1

    wait_for(lambda: len(store.sweep_buckets("a", interval_s)) == SHARDS, timeout=15, what="a to take b's buckets")


def test_a_workflow_runs_on_a_cluster_with_its_run_on_one_master_and_the_indices_on_all(
    cluster: RedisClusterServers, client: Client, cluster_workers: LocalWorkers, unique: str
) -> None:
    definition = workflow(
        f"cluster_{unique}",
        py("a", "tests.count_on_broker"),
        py("b", "tests.count_on_broker", "a"),
        py("c", "tests.count_on_broker", "a"),
        py("d", "tests.count_on_broker", "b", "c"),
        py("e", "tests.big_output", "d", size=300),
        timeout_s=600,
    )
    run_ids = [client.submit(definition) for _ in range(12)]

    views = [client.wait(run_id, timeout=60) for run_id in run_ids]

    assert [view["status"] for view in views] == ["succeeded"] * len(run_ids)
    assert [view["steps"]["e"]["output"] for view in views] == ["x" * 300] * len(run_ids)
    owner = cluster.master_of(keys.run_key(run_ids[0]))
    assert _node(owner.port).hget(keys.run_key(run_ids[0]), "status") == "succeeded"
    assert _node(owner.port).exists(keys.events_key(run_ids[0])), "the run's events live on the run's slot"
    assert _node(owner.port).exists(keys.large_values_key(run_ids[0])), "so do its long values once it ended"
    holders = collections.Counter(cluster.master_of(keys.runs_index_key(s)).port for s in keys.all_shards(SHARDS))
    assert sorted(holders.values()) == [2, 2, 2], "the runs index is split evenly over the masters"
    assert set(client.store.list_run_ids(limit=100)) >= set(run_ids)
    assert not any(client.store.expired_leases()), "every lease was released"
    # The deadline index and the global stream live on other slots than the run: its end reaches both all the same.
    for run_id in run_ids:
        bucket = keys.shard_of(run_id, SHARDS)
        assert client.store.client.zscore(keys.deadlines_key(bucket), keys.deadline_member(run_id, "1")) is None
        entries = [fields for _, fields in client.store.client.xrange(keys.global_events_key(bucket))]
        types = [fields[b"type"] for fields in entries if fields[b"run_id"] == run_id.encode()]
        assert types == [b"run_started", b"run_succeeded"], run_id


def test_the_api_serves_status_events_and_streamed_text_through_the_cluster(
    client: Client, cluster_workers: LocalWorkers, unique: str
) -> None:
    with (
        ApiServer(client) as server,
        httpx.Client(base_url=f"http://127.0.0.1:{server.port}", headers=bearer(ADMIN), timeout=30) as api,
    ):
        run_id = api.post("/runs", json={"definition": streaming(f"cluster_stream_{unique}", latency=1.5)}).json()[
            "run_id"
        ]
        with api.stream("GET", f"/runs/{run_id}/events") as response:
            received = list(frames(response))
        view = finished(api, run_id)
        listed = api.get("/runs", params={"workflow": f"cluster_stream_{unique}"}).json()

    assert view["status"] == "succeeded"
    assert [f["event"] for f in received if f["event"] in {"run_started", "run_succeeded"}][-1] == "run_succeeded"
    deltas = deltas_of(received)
    assert len(deltas) >= 3, "streamed text reached the client through sharded pub/sub"
    assert "".join(data["text"] for _, data in deltas) == view["steps"]["write"]["output"]["text"]
    assert run_id in str(listed)


def test_a_master_killed_with_50_runs_in_flight_loses_nothing_and_runs_no_step_twice(
    cluster: RedisClusterServers,
    broker: RedisServer,
    client: Client,
    cluster_workers: LocalWorkers,
    unique: str,
) -> None:
    definition = workflow(
        f"cluster_failover_{unique}",
        py("a", "tests.sleep", seconds=0.2),
        py("b", "tests.count_on_broker", "a"),
        py("c", "tests.sleep", "b", seconds=0.2),
        py("d", "tests.count_on_broker", "c"),
    )
    run_ids = [client.submit(definition) for _ in range(50)]
    victim_key = keys.run_key(run_ids[0])
    wait_for(
        lambda: sum(client.status(r)["steps"]["a"]["status"] == "succeeded" for r in run_ids) >= 5,
        timeout=60,
        what="some runs to be half way",
    )

    killed = cluster.kill_master_of(victim_key)
    cluster.wait_ready(timeout_s=30)

    assert cluster.master_of(victim_key).port != killed.port, "the replica took over"
    views = [client.wait(run_id, timeout=120) for run_id in run_ids]
    assert [view["status"] for view in views].count("succeeded") == len(run_ids), [v["status"] for v in views]
    counter = _node(broker.port)
    # A step whose lease ran out while its finish waited for the failover may run again before it succeeds (that is
    # what leases are for); what must never happen is a run after it succeeded: every execution is a recorded attempt
    # (an attempt cut off before its function ran counts as an attempt without a call).
    calls = {
        (i, step): int(counter.get(f"test:calls:{run_id}:{step}") or 0)
        for i, run_id in enumerate(run_ids)
        for step in "bd"
    }
    attempts = {(i, step): views[i]["steps"][step]["attempts"] for i, _ in enumerate(run_ids) for step in "bd"}
    assert all(1 <= calls[k] <= attempts[k] for k in calls), (
        "each counted step ran, at most once per recorded attempt",
        calls,
        attempts,
    )
    reruns = sum(step["attempts"] - 1 for view in views for step in view["steps"].values())
    # Each worker slot runs one step at a time, so no more than one step per slot can be in flight on the killed master.
    in_flight = WORKERS * CONCURRENCY
    assert reruns <= in_flight, f"a failover re-runs at most the steps in flight on the killed master, not {reruns}"
