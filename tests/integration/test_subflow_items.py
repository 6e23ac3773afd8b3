"""Workflow map steps on real workers: resume continues each failed child, cancel reaches every child, a redelivered
parent step never starts a second child."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from orchestrator import Client
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.engine.runtime import build_runtime
from orchestrator.engine.subflow import start_child
from tests.conftest import ARTIFACTS, WORKER_ENV
from tests.integration.helpers import py, wait_for, workflow
from tests.integration.test_subflow import child, compose

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _gated_map(unique: str, function: str = "tests.gate", **args: Any) -> dict[str, Any]:
    inline = child(f"item_child_{unique}", py("work", function, **args))
    per_item = {
        "name": "per_item",
        "uses": "workflow",
        "for_each": "['a', 'b']",
        "with": {"definition": inline, "inputs": {"text": "{{ item }}"}},
    }
    return workflow(f"map_parent_{unique}", per_item)


def test_resume_of_a_workflow_map_resumes_each_failed_child_instead_of_starting_another(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    run_id = client.submit(_gated_map(unique))
    view = client.wait(run_id, timeout=40)
    assert view["status"] == "failed"
    children = [r["child_run_id"] for r in client.items(run_id, "per_item")["items"]]
    assert [client.status(c)["status"] for c in children] == ["failed", "failed"]

    for c in children:
        redis_client.set(f"test:fixed:{c}", "1", ex=300)
    client.resume(run_id)
    view = client.wait(run_id, timeout=40)

    assert view["status"] == "succeeded", view
    records = client.items(run_id, "per_item")["items"]
    assert [r["child_run_id"] for r in records] == children, "the same children, resumed"
    assert [client.status(c)["generation"] for c in children] == [2, 2]
    assert view["steps"]["per_item"]["output"] == [{"work": {"fixed": True}}] * 2
    started = [e for e in client.store.events(run_id) if e.type == "item_waiting"]
    assert {e.data["child_run_id"] for e in started} == set(children), "no other child was ever started"


def test_cancelling_a_parent_cancels_the_running_children_of_its_map_items_and_a_late_one(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    run_id = client.submit(_gated_map(unique, "tests.sleep", seconds=20))
    waiting = lambda: (client.status(run_id)["steps"]["per_item"].get("items") or {}).get("waiting")  # noqa: E731
    wait_for(lambda: waiting() == 2, what="both items waiting")
    children = [r["child_run_id"] for r in client.items(run_id, "per_item")["items"]]
    for c in children:
        wait_for(lambda c=c: client.status(c)["steps"]["work"]["status"] == "running", what="the child's step")

    client.cancel(run_id)

    assert [client.status(c)["status"] for c in children] == ["cancelled", "cancelled"]
    assert [client.status(c)["steps"]["work"]["status"] for c in children] == ["cancelled", "cancelled"]
    assert client.status(run_id)["steps"]["per_item"]["items"]["cancelled"] == 2
    # An item that started its child just as the cancel landed (what its attempt does next): the child is stopped
    # at once, never left running.
    runtime = build_runtime(client.settings, client.publisher)
    late = start_child(
        runtime,
        run_id,
        "per_item",
        7,
        ref=client.resolve(_gated_map(unique)["steps"][0]["with"]["definition"]),
        inputs={"text": "late"},
        generation="1",
    )
    assert late not in children
    assert client.status(late)["status"] == "cancelled"


def test_a_parent_step_redelivered_after_its_worker_was_killed_right_after_start_child_starts_no_second_child(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    queue, once = f"killer_{unique}", f"test:killed:{unique}"
    env = {**WORKER_ENV, "REDIS_URL": client.settings.redis_url, "TEST_KILL_ONCE_KEY": once}
    env["ORCH_IMPORTS"] = f"{env['ORCH_IMPORTS']},tests.kill_after_start_child"
    inline = child(f"once_{unique}", py("work", "tests.count_calls"))
    step = {**compose("compose", {"definition": inline, "inputs": {"text": "x"}}), "queue": queue}
    with LocalWorkers(client.app, count=1, concurrency=1, env=env, queues=(queue,), log_dir=ARTIFACTS):
        run_id = client.submit(workflow(f"killed_parent_{unique}", step))
        view = client.wait(run_id, timeout=120)

    killed_child = redis_client.get(once)
    assert killed_child is not None, "the process running the parent step was killed right after start_child"
    assert view["status"] == "succeeded", view
    assert view["steps"]["compose"]["child_run_id"] == killed_child, "the redelivered step found the same child"
    events = client.store.events(run_id)
    assert sum(e.type == "step_started" for e in events) >= 2, "the step ran again after the kill"
    assert redis_client.get(f"test:calls:{killed_child}:work") == "1"
    assert {e.data["child_run_id"] for e in events if e.type == "step_waiting"} == {killed_child}, "one child only"
