"""Scale: steps routed by kind to a threads pool (``llm``) and a prefork pool (``cpu``), and a threads pool's shared
pieces (one state store, one SDK client, one lease heartbeat per process) under many steps at once."""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from orchestrator import Client, Settings
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.state import RedisStateStore
from tests.conftest import ARTIFACTS, WORKER_ENV
from tests.integration.helpers import llm, py, queue_length, ts, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def log_dir() -> Path:
    path = ARTIFACTS / "worker-logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def queues(unique: str) -> tuple[str, str]:
    """Private names for the llm and cpu queues, so the session's workers never take these steps."""
    return f"llm_{unique}", f"cpu_{unique}"


@pytest.fixture
def routed(settings: Settings, queues: tuple[str, str]) -> Client:
    """A client publishing ``llm`` steps to the private llm queue and every other kind to the private cpu queue."""
    llm_queue, cpu_queue = queues
    return Client(replace(settings, llm_queue=llm_queue, cpu_queue=cpu_queue))


@pytest.fixture
def worker_env(redis_url: str, queues: tuple[str, str]) -> dict[str, str]:
    # Workers publish the children a finishing step releases, so they must route by the same queue names.
    llm_queue, cpu_queue = queues
    return {"REDIS_URL": redis_url, **WORKER_ENV, "ORCH_LLM_QUEUE": llm_queue, "ORCH_CPU_QUEUE": cpu_queue}


def test_llm_steps_run_on_the_threads_worker_and_python_steps_on_the_prefork_worker_or_their_own_queue(
    *,
    routed: Client,
    queues: tuple[str, str],
    worker_env: dict[str, str],
    redis_client: redis.Redis,
    log_dir: Path,
    unique: str,
) -> None:
    llm_queue, cpu_queue = queues
    side_queue = f"side_{unique}"
    cpu = max(os.sched_getaffinity(0))
    worker_env = {**worker_env, "ORCH_GIL_SWITCH_S": "0.037", "ORCH_GC_THRESHOLD": "4321", "ORCH_WORKER_CPUS": str(cpu)}
    spec = workflow(
        f"routing_{unique}",
        llm("draft"),
        py("check", "tests.sleep", "draft"),
        py("side", "tests.sleep", "draft", queue=side_queue),
    )
    threads = LocalWorkers(
        routed.app, count=1, pool="threads", concurrency=8, queues=(llm_queue,), env=worker_env, log_dir=log_dir
    )
    prefork = LocalWorkers(
        routed.app, count=1, pool="prefork", concurrency=1, queues=(cpu_queue,), env=worker_env, log_dir=log_dir
    )
    side = LocalWorkers(
        routed.app, count=1, pool="threads", concurrency=2, queues=(side_queue,), env=worker_env, log_dir=log_dir
    )
    with threads:
        run_id = routed.submit(spec)
        # Only the threads worker consumes the llm queue, and nothing consumes the others yet: the python steps
        # wait as messages in their own queues.
        wait_for(
            lambda: queue_length(redis_client, cpu_queue) == queue_length(redis_client, side_queue) == 1,
            timeout=30,
            what="the released python steps to wait in the cpu and side queues",
        )
        view = routed.status(run_id)
        assert view["steps"]["draft"]["status"] == "succeeded"
        assert view["steps"]["check"]["status"] == view["steps"]["side"]["status"] == "queued"

        with prefork:
            wait_for(
                lambda: routed.status(run_id)["steps"]["check"]["status"] == "succeeded",
                timeout=30,
                what="the python step on the prefork worker",
            )
            (name,) = prefork.processes
            assert routed.status(run_id)["steps"]["check"]["output"]["pid"] in prefork.pool_children(name)
            # Its `queue:` keeps the other python step off the cpu queue.
            assert queue_length(redis_client, side_queue) == 1
            assert routed.status(run_id)["steps"]["side"]["status"] == "queued"

            with side:
                view = routed.wait(run_id, timeout=30)
                (side_process,) = side.processes.values()

    assert view["status"] == "succeeded", view["error"]
    # A threads pool runs the step in the worker's own process.
    assert view["steps"]["side"]["output"]["pid"] == side_process.pid
    # Both pools run steps at the worker's switch interval (a prefork pool's processes inherit it).
    assert view["steps"]["side"]["output"]["switch_s"] == pytest.approx(0.037)
    assert view["steps"]["check"]["output"]["switch_s"] == pytest.approx(0.037)
    # And with the worker's collector threshold, what the worker held at start frozen out of collections, on the
    # worker's CPU.
    for step in ("side", "check"):
        assert view["steps"][step]["output"]["gc_threshold"] == 4321
        assert view["steps"][step]["output"]["gc_frozen"] > 1000
        assert view["steps"][step]["output"]["cpus"] == [cpu]


def test_a_threads_worker_runs_as_many_llm_steps_at_once_as_it_has_threads_each_exactly_once(
    routed: Client, queues: tuple[str, str], worker_env: dict[str, str], log_dir: Path, unique: str
) -> None:
    width = 60
    spec = workflow(f"wide_{unique}", *(llm(f"s{i}", latency=1.0) for i in range(width)))
    # A 3 s lease (WORKER_ENV) renewed by one heartbeat thread for all of them, and one SDK client shared by all.
    with LocalWorkers(
        routed.app, count=1, pool="threads", concurrency=width, queues=(queues[0],), env=worker_env, log_dir=log_dir
    ):
        view = routed.wait(routed.submit(spec), timeout=60)

    assert view["status"] == "succeeded", view["error"]
    steps = view["steps"].values()
    assert [s["attempts"] for s in steps] == [1] * width
    assert all(s["errors"] == [] for s in steps)
    # Sixty one-second calls in far less than sixty seconds: they overlapped on the threads.
    assert max(ts(s["finished_at"]) for s in steps) - min(ts(s["started_at"]) for s in steps) < 10


def test_more_threads_than_the_stores_connections_wait_for_one_instead_of_failing(redis_url: str) -> None:
    store = RedisStateStore.from_url(redis_url, max_connections=2)
    empty = f"test:nothing:{uuid.uuid4().hex}"
    errors: list[BaseException] = []

    def hold_a_connection() -> None:
        try:
            store.client.blpop([empty], timeout=0.3)  # keeps its connection for 0.3 s
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hold_a_connection) for _ in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    # Two connections for eight 0.3 s holds: they took turns, four rounds.
    assert time.monotonic() - started >= 4 * 0.3 * 0.9
