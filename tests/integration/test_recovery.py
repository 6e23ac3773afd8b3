"""Workers killed mid-step lose nothing; duplicates neither re-run nor overwrite a finished step."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
import redis

from orchestrator import Client
from orchestrator.dev.local_workers import LocalWorkers
from tests.conftest import ARTIFACTS, WORKER_ENV
from tests.integration.helpers import held_by_workers, py, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _first_pid(redis_client: redis.Redis, run_id: str, step: str) -> int:
    raw = wait_for(lambda: redis_client.lindex(f"test:pids:{run_id}:{step}", 0), what=f"{step} to start")
    return int(str(raw).split(":")[0])


def _in_broker(redis_client: redis.Redis, task_id: str) -> bool:
    return any(task_id in message for message in redis_client.lrange("cpu", 0, -1))


def test_killing_a_pool_child_mid_step_reruns_the_step_and_the_run_succeeds(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    spec = workflow(
        f"kill_child_{unique}",
        py("slow", "tests.report_pid_then_sleep", seconds=2.0),
        py("after", "tests.count_calls", "slow"),
    )
    run_id = client.submit(spec)
    pid = _first_pid(redis_client, run_id, "slow")
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)

    view = client.wait(run_id, timeout=60)

    step = view["steps"]["slow"]
    assert view["status"] == "succeeded"
    assert step["attempts"] == 2
    assert step["errors"][0]["type"] == "worker_lost"
    assert step["output"]["pid"] != pid
    assert view["steps"]["after"]["output"]["calls"] == 1
    # Bounded by lease (3 s here) + sweep interval, not by the broker's visibility timeout (hours).
    assert time.time() - killed_at < 20


def test_killing_a_whole_worker_mid_step_reruns_the_step_elsewhere(
    client: Client, redis_url: str, redis_client: redis.Redis, unique: str
) -> None:
    queue = f"kill_{unique}"
    log_dir = ARTIFACTS / "worker-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    pool = LocalWorkers(
        client.app, count=2, concurrency=1, queues=(queue,), env={"REDIS_URL": redis_url, **WORKER_ENV}, log_dir=log_dir
    )
    with pool:
        spec = workflow(f"kill_worker_{unique}", py("slow", "tests.report_pid_then_sleep", seconds=2.0, queue=queue))
        run_id = client.submit(spec)
        pid = _first_pid(redis_client, run_id, "slow")
        victim = next(name for name in pool.processes if pid in pool.pool_children(name))
        killed_at = time.time()
        pool.kill(victim)

        view = client.wait(run_id, timeout=60)

    step = view["steps"]["slow"]
    assert view["status"] == "succeeded"
    assert step["attempts"] == 2
    assert step["errors"][0]["type"] == "worker_lost"
    assert time.time() - killed_at < 25


def test_a_long_step_is_never_started_twice_while_its_worker_lives(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    # 8 s is well past the 3 s lease: only the heartbeat keeps the sweeper from starting a second copy.
    spec = workflow(f"long_{unique}", py("long", "tests.report_pid_then_sleep", seconds=8.0))
    view = client.wait(client.submit(spec), timeout=60)

    assert view["status"] == "succeeded"
    assert view["steps"]["long"]["attempts"] == 1
    assert redis_client.llen(f"test:pids:{view['run_id']}:long") == 1


def test_a_duplicate_delivery_of_a_finished_step_neither_reruns_nor_overwrites_it(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    spec = client.resolve(
        workflow(f"dup_{unique}", py("once", "tests.count_calls"), py("next", "tests.count_calls", "once"))
    )
    run_id = client.submit(spec)
    before = client.wait(run_id, timeout=30)

    marker = uuid.uuid4().hex
    client.publisher.publish(spec, run_id=run_id, steps=["once"], generation="1", task_ids={"once": marker})
    # With late acks a worker holds the message until its task has returned.
    wait_for(
        lambda: not _in_broker(redis_client, marker) and not held_by_workers(client.app, marker),
        what="the duplicate to be processed and acked",
    )

    after = client.status(run_id)
    assert redis_client.get(f"test:calls:{run_id}:once") == "1"
    assert redis_client.get(f"test:calls:{run_id}:next") == "1"
    assert after["steps"]["once"] == before["steps"]["once"]
