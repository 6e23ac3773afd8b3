"""Redis Sentinel with real processes: a private master, a replica and a Sentinel (``redis-server --sentinel``), real
worker processes, and ``REDIS_URL=redis+sentinel://…`` for state and broker alike.

Checked: a workflow runs with both the state store and the broker found through Sentinel; after ``SENTINEL FAILOVER``
(the replica promoted, the old master demoted) a run that was in flight and a new one both finish on the new master;
a demoted master's ``READONLY`` reaches the workers as a connection error, which they wait out like any outage.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from orchestrator import Client, Settings
from orchestrator.api import ApiAuth, StreamLimits, create_app
from orchestrator.api.auth import Principal, Scope
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.dev.redis_server import find_redis_server
from orchestrator.engine.outage import OUTAGE_ERRORS, retry_through_outage
from orchestrator.state import RedisStateStore, keys
from tests.conftest import ARTIFACTS, IN_CI, WORKER_ENV
from tests.integration.helpers import llm, py, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MASTER_NAME = "orchmaster"
# Writes the old master took between the promotion and its demotion are lost (Redis replication is asynchronous):
# a step message lost so is re-sent by the sweeper after the queued grace, shortened here from 300 s.
ENV = {**WORKER_ENV, "ORCH_QUEUED_GRACE_S": "5"}
LOG_DIR = ARTIFACTS / "worker-logs"
TOKEN = "sentinel-api-token-0001"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


class RedisProcesses:
    """``redis-server`` children (servers and Sentinels) in one directory, each stopped by its pid at the end."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.processes: list[subprocess.Popen[bytes]] = []
        self._names = itertools.count(1)

    def server(self, *args: str) -> int:
        """Start a data server with ``args``; returns its port once it answers."""
        port = _free_port()
        name = f"redis-{next(self._names)}"
        return self._start(
            port,
            name,
            [
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "no",
                *args,
            ],
        )

    def sentinel(self, master_port: int) -> int:
        """Start a Sentinel monitoring the master at ``master_port`` with quorum 1; returns its port."""
        port = _free_port()
        name = f"sentinel-{next(self._names)}"
        config = self.directory / f"{name}.conf"
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 2000\n"
            f"sentinel failover-timeout {MASTER_NAME} 10000\n"
        )
        # The config file comes first; a Sentinel rewrites it with what it learns.
        return self._start(port, name, [str(config), "--sentinel"])

    def _start(self, port: int, name: str, args: list[str]) -> int:
        log = self.directory / f"{name}.log"
        argv = [self.binary, *args, "--logfile", str(log)]
        process = subprocess.Popen(
            argv, cwd=self.directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self.processes.append(process)
        wait_for(lambda: _answers(port) or process.poll() is not None, timeout=20, what=f"{name} to answer")
        assert process.poll() is None, log.read_text(errors="replace")
        return port

    def stop(self) -> None:
        """Terminate every process started here, by pid, and reap it."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


class SentinelGroup:
    """A master, its replica and one Sentinel watching them."""

    def __init__(self, processes: RedisProcesses) -> None:
        self.master = processes.server()
        self.replica = processes.server("--replicaof", "127.0.0.1", str(self.master))
        self.sentinel = processes.sentinel(self.master)
        self.url = f"redis+sentinel://127.0.0.1:{self.sentinel}/{MASTER_NAME}/0"

    def sentinel_client(self) -> redis.Redis:
        return redis.Redis(port=self.sentinel, decode_responses=True, socket_timeout=5)

    def master_port(self) -> int:
        """The master's port, as the Sentinel names it now."""
        _, port = self.sentinel_client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        return int(port)

    def fail_over(self) -> None:
        """``SENTINEL FAILOVER`` once the Sentinel knows the synced replica.

        Returns when the Sentinel names the replica as master and has demoted the old master, which is when it also
        closes the old master's client connections (until then, clients holding one still write there).
        """
        sentinel = self.sentinel_client()
        wait_for(lambda: _replica_synced(self.replica), timeout=30, what="the replica to sync")
        wait_for(
            lambda: sentinel.execute_command("SENTINEL", "REPLICAS", MASTER_NAME),
            timeout=30,
            what="the Sentinel to discover the replica",
        )
        sentinel.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        wait_for(lambda: self.master_port() == self.replica, timeout=30, what="the Sentinel to name the new master")
        wait_for(lambda: _role(self.replica) == "master", timeout=30, what="the replica to be promoted")
        wait_for(lambda: _role(self.master) == "slave", timeout=30, what="the old master to be demoted")


def _replica_synced(port: int) -> bool:
    info = redis.Redis(port=port, decode_responses=True).info("replication")
    return info.get("master_link_status") == "up"


def _role(port: int) -> str:
    return str(redis.Redis(port=port, decode_responses=True).info("replication")["role"])


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[RedisProcesses]:
    binary = find_redis_server()
    if binary is None:
        if IN_CI:
            pytest.fail("no redis-server binary (CI=true: the Sentinel tests must run)")
        pytest.skip("no redis-server binary")
    started = RedisProcesses(binary, tmp_path)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def group(processes: RedisProcesses) -> SentinelGroup:
    return SentinelGroup(processes)


@pytest.fixture
def client(group: SentinelGroup) -> Client:
    return Client(Settings.from_env({"REDIS_URL": group.url, **ENV}))


@pytest.fixture
def sentinel_workers(client: Client, group: SentinelGroup) -> Iterator[LocalWorkers]:
    """One real prefork worker with two slots, state and broker both through the Sentinel."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with LocalWorkers(client.app, count=1, concurrency=2, env={"REDIS_URL": group.url, **ENV}, log_dir=LOG_DIR) as pool:
        yield pool


def test_a_workflow_runs_with_state_and_broker_found_through_sentinel(
    group: SentinelGroup, client: Client, sentinel_workers: LocalWorkers, unique: str
) -> None:
    run_id = client.submit(
        workflow(
            f"sentinel_{unique}", py("a", "tests.count_calls"), llm("b", "a"), py("c", "tests.count_calls", "a", "b")
        )
    )

    view = client.wait(run_id, timeout=60)

    assert view["status"] == "succeeded", view
    assert [view["steps"][s]["attempts"] for s in "abc"] == [1, 1, 1]
    master = redis.Redis(port=group.master, decode_responses=True)
    assert master.hget(keys.run_key(run_id), "status") == "succeeded"
    assert client.app.conf.broker_transport_options["master_name"] == MASTER_NAME
    assert client.app.conf.broker_url.startswith(f"sentinel://127.0.0.1:{group.sentinel}/0")


def test_the_api_serves_status_and_the_event_stream_through_sentinel(
    client: Client, sentinel_workers: LocalWorkers, unique: str
) -> None:
    run_id = client.submit(workflow(f"sentinel_api_{unique}", py("a", "tests.count_calls")))
    assert client.wait(run_id, timeout=60)["status"] == "succeeded"
    auth = ApiAuth(((TOKEN, Principal("ops", frozenset(Scope))),))

    with TestClient(create_app(client.settings, client, auth=auth, streams=StreamLimits(block_ms=200))) as http:
        status = http.get(f"/runs/{run_id}", headers={"Authorization": f"Bearer {TOKEN}"})
        events = http.get(f"/runs/{run_id}/events", headers={"Authorization": f"Bearer {TOKEN}"})

    assert status.json()["status"] == "succeeded"
    assert events.status_code == 200
    assert "event: run_succeeded" in events.text


def test_after_a_failover_a_run_in_flight_and_a_new_run_finish_on_the_new_master(
    group: SentinelGroup, client: Client, sentinel_workers: LocalWorkers, unique: str
) -> None:
    before = client.submit(workflow(f"sentinel_before_{unique}", py("a", "tests.count_calls")))
    assert client.wait(before, timeout=60)["status"] == "succeeded"
    in_flight = client.submit(
        workflow(f"sentinel_flight_{unique}", llm("slow", latency=2.0), llm("after", "slow", latency=0.5))
    )
    wait_for(lambda: client.status(in_flight)["steps"]["slow"]["status"] == "running", what="the slow step to run")

    group.fail_over()
    after = client.submit(
        workflow(f"sentinel_after_{unique}", py("a", "tests.count_calls"), py("b", "tests.count_calls", "a"))
    )

    assert client.wait(in_flight, timeout=90)["status"] == "succeeded"
    assert client.wait(after, timeout=60)["status"] == "succeeded"
    new_master = redis.Redis(port=group.replica, decode_responses=True)
    for run_id in (in_flight, after):
        assert new_master.hget(keys.run_key(run_id), "status") == "succeeded"


def test_a_demoted_masters_readonly_reaches_the_workers_as_an_outage_they_wait_out(
    processes: RedisProcesses, group: SentinelGroup
) -> None:
    # A replica of nothing answers every write with READONLY, as a demoted master does until clients move on.
    demoted = processes.server("--replicaof", "127.0.0.1", str(_free_port()))
    store = RedisStateStore.from_url(group.url)
    pool: Any = store.client.connection_pool
    real = pool.sentinel_manager.discover_master
    answers = iter([("127.0.0.1", demoted)] * 3)
    pool.sentinel_manager.discover_master = _first_then(answers, real)

    with pytest.raises(OUTAGE_ERRORS) as outage:
        store.client.set("orch:test:readonly", "1")
    assert isinstance(outage.value, redis.ConnectionError)
    assert not isinstance(outage.value, redis.ResponseError)
    assert "slave" in str(outage.value) or "replica" in str(outage.value)

    answers = iter([("127.0.0.1", demoted)] * 5)
    pool.sentinel_manager.discover_master = _first_then(answers, real)
    assert retry_through_outage("test write", lambda: store.client.set("orch:test:readonly", "2"), patience_s=30)
    assert redis.Redis(port=group.master).get("orch:test:readonly") == b"2"
    assert next(answers, None) is None, "the demoted master was tried first"


def _first_then(answers: Iterator[tuple[str, int]], real: Callable[[str], Any]) -> Callable[[str], Any]:
    def discover(name: str) -> Any:
        return next(answers, None) or real(name)

    return discover
