"""Batched messages on real workers: a fan-out wider than twice the workers' slots goes out as fewer messages, each
carrying several steps, and every step is still claimed, announced and recovered on its own.

The session's workers have 4 slots (2 workers of 2), so a fan-out of more than 8 children is batched
(``orchestrator/engine/batches.py``). Each leaf records the message it ran in (``tests.report_message_then_sleep``):
a leaf whose message names another step rode in that step's batch.
"""

from __future__ import annotations

import os
import signal

import pytest
import redis

from orchestrator import Client
from orchestrator.dev.local_workers import LocalWorkers
from tests.integration.helpers import py, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WIDTH = 24


def fan_out(name: str, seconds: float) -> dict[str, object]:
    leaves = [
        py(f"leaf{i}", "tests.report_message_then_sleep", "root", seconds=seconds, queue="cpu") for i in range(WIDTH)
    ]
    return workflow(name, py("root", "tests.count_calls"), *leaves)


def records(redis_client: redis.Redis, run_id: str, step: str) -> list[tuple[int, int, str, str]]:
    """``(pid, attempt, message task id, message's own step)`` of each time ``step`` ran."""
    rows = []
    for raw in redis_client.lrange(f"test:pids:{run_id}:{step}", 0, -1):
        pid, attempt, task_id, carried_by = str(raw).split(":")
        rows.append((int(pid), int(attempt), task_id, carried_by))
    return rows


def first_passenger(redis_client: redis.Redis, run_id: str) -> tuple[str, int, str]:
    """Wait for a leaf running in another leaf's batch: its name, pid and the message it rides in."""

    def found() -> tuple[str, int, str] | None:
        for i in range(WIDTH):
            for pid, _, task_id, carried_by in records(redis_client, run_id, f"leaf{i}"):
                if carried_by.startswith("leaf") and carried_by != f"leaf{i}":
                    return f"leaf{i}", pid, task_id
        return None

    return wait_for(found, timeout=30, what="a step of a batch to start")


def test_a_wide_fan_out_travels_in_fewer_messages_and_runs_every_step_once_under_its_own_attempt(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    run_id = client.submit(fan_out(f"batch_{unique}", 0.0))

    view = client.wait(run_id, timeout=60)

    assert view["status"] == "succeeded"
    runs = {f"leaf{i}": records(redis_client, run_id, f"leaf{i}") for i in range(WIDTH)}
    assert all(len(rows) == 1 for rows in runs.values()), "every leaf ran exactly once"
    assert all(view["steps"][leaf]["attempts"] == 1 for leaf in runs)
    messages = {rows[0][2] for rows in runs.values()}
    assert len(messages) < WIDTH / 2, f"{WIDTH} leaves came in {len(messages)} messages: batched"
    passengers = [leaf for leaf, rows in runs.items() if rows[0][3] != leaf]
    assert passengers, "some leaves rode in another leaf's message"


def test_a_pool_child_killed_mid_batch_loses_no_step_and_reruns_only_the_one_it_was_running(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    run_id = client.submit(fan_out(f"batch_kill_{unique}", 0.3))
    victim, pid, _ = first_passenger(redis_client, run_id)
    os.kill(pid, signal.SIGKILL)

    view = client.wait(run_id, timeout=90)

    assert view["status"] == "succeeded"
    assert view["steps"][victim]["attempts"] == 2
    assert view["steps"][victim]["errors"][0]["type"] == "worker_lost"
    others = [f"leaf{i}" for i in range(WIDTH) if f"leaf{i}" != victim]
    assert [leaf for leaf in others if view["steps"][leaf]["attempts"] != 1] == [], "no other step ran twice"
    assert all(len(records(redis_client, run_id, leaf)) == 1 for leaf in others)


def test_cancelling_a_run_mid_batch_interrupts_the_running_step_and_starts_none_of_the_rest(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    run_id = client.submit(fan_out(f"batch_cancel_{unique}", 1.0))
    first_passenger(redis_client, run_id)

    client.cancel(run_id)

    def settled() -> bool:
        pending = redis_client.lrange("cpu", 0, -1) + redis_client.hvals("unacked")
        running = [s for s, v in client.status(run_id)["steps"].items() if v["status"] == "running"]
        return not running and not any(run_id in message for message in pending)

    # Once nothing of the run waits in the broker or runs, nothing of it can start any more.
    wait_for(settled, timeout=30, what="the cancelled run's messages to drain")
    started = {f"leaf{i}" for i in range(WIDTH) if records(redis_client, run_id, f"leaf{i}")}
    view = client.status(run_id)
    assert view["status"] == "cancelled"
    assert len(started) < WIDTH, "the steps not yet started when it was cancelled never started"
    assert all(view["steps"][f"leaf{i}"]["status"] != "succeeded" or f"leaf{i}" in started for i in range(WIDTH))


def test_a_step_cancelled_by_cancel_others_takes_none_of_its_batch_with_it(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    # The root's slot keeps its first child (k); the others go in batches of 3 in release order: [slow, p0, p1],
    # [fast, p2, p3], ... When fast ends, the join cancels slow, running or not yet started, and Celery drops slow's
    # whole message: p0 and p1 must still run now, not after the sweeper's grace (300 s here, past this test's timeout).
    kept = py("k", "tests.count_calls", "root", queue="cpu")
    slow = py("slow", "tests.report_message_then_sleep", "root", seconds=20, queue="cpu")
    fast = py("fast", "tests.count_calls", "root", queue="cpu")
    rest = [py(f"p{i}", "tests.report_message_then_sleep", "root", queue="cpu") for i in range(WIDTH - 2)]
    join = {**py("answer", "tests.count_calls", "fast", "slow"), "trigger_rule": "one_success", "cancel_others": True}
    run_id = client.submit(
        workflow(f"batch_hedge_{unique}", py("root", "tests.count_calls"), kept, slow, *rest[:2], fast, *rest[2:], join)
    )

    view = client.wait(run_id, timeout=60)

    assert view["status"] == "succeeded"
    assert (view["steps"]["slow"]["status"], view["steps"]["answer"]["status"]) == ("cancelled", "succeeded")
    assert [len(records(redis_client, run_id, p)) for p in ("p0", "p1")] == [1, 1], "each ran once"
    assert all(view["steps"][f"p{i}"]["attempts"] == 1 for i in range(WIDTH - 2))
