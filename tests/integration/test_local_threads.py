"""Continuing locally on a threads pool: a finish keeps every released child its worker can start, the first in its
own slot and the others in the pool's other threads, so a fan-out after a step costs no message at all; each kept
child is still announced in task events (what Flower shows), and one lost with its worker is recovered.

The worker's own count of the task messages it received (``inspect stats``, ``total``) tells messages from local
hops, which never pass through its consumer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from orchestrator import Client, Settings
from orchestrator.dev.local_workers import LocalWorkers
from tests.conftest import ARTIFACTS, WORKER_ENV
from tests.integration.helpers import llm, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CHILDREN = ("social", "email", "seo")


@pytest.fixture
def routed(settings: Settings, unique: str) -> Client:
    """A client publishing every step to private queues, so the session's workers never take these steps."""
    return Client(replace(settings, llm_queue=f"llm_{unique}", cpu_queue=f"cpu_{unique}"))


def threads_workers(routed: Client, redis_url: str, concurrency: int, *, lease_s: float | None = None) -> LocalWorkers:
    """One threads worker on the private llm queue (not started); ``lease_s`` in place of the tests' short lease."""
    log_dir = ARTIFACTS / "worker-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    settings = routed.settings
    env = {"REDIS_URL": redis_url, **WORKER_ENV, "ORCH_LLM_QUEUE": settings.llm_queue}
    if lease_s is not None:
        env["ORCH_LEASE_S"] = str(lease_s)
    env["ORCH_CPU_QUEUE"] = settings.cpu_queue
    return LocalWorkers(
        routed.app,
        count=1,
        pool="threads",
        concurrency=concurrency,
        queues=(settings.llm_queue,),
        env=env,
        log_dir=Path(log_dir),
    )


@pytest.fixture
def threads_worker(routed: Client, redis_url: str) -> LocalWorkers:
    return threads_workers(routed, redis_url, 8)


@pytest.fixture
def task_events(routed: Client) -> Iterator[list[dict[str, Any]]]:
    """Every event the workers send while the test runs (what Flower reads)."""
    seen: list[dict[str, Any]] = []
    with routed.app.connection_for_read() as connection:
        receiver = routed.app.events.Receiver(connection, handlers={"*": seen.append})
        thread = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False), daemon=True)
        thread.start()
        yield seen
        receiver.should_stop = True
        thread.join(10)


def listening(seen: list[dict[str, Any]]) -> None:
    """Wait until the receiver hears the worker (its events from then on are all seen)."""
    wait_for(lambda: any(e["type"].startswith("worker-") for e in seen), timeout=30, what="a worker event")


def messages_received(workers: LocalWorkers) -> int:
    """Step messages the (one) worker took from the broker."""
    (name,) = workers.processes
    stats = workers.app.control.inspect(destination=[name], timeout=5).stats() or {}
    # Counted by the name each message's task shows (its shadow name, ``WORKFLOW.STEP``).
    return sum(int(n) for n in stats[name]["total"].values())


def fan_out(name: str, latency: float) -> dict[str, Any]:
    return workflow(name, llm("blog_post"), *(llm(child, "blog_post", latency=latency) for child in CHILDREN))


def test_a_fan_out_after_a_step_runs_on_the_parents_one_message_with_task_events_for_every_child(
    routed: Client, threads_worker: LocalWorkers, task_events: list[dict[str, Any]], unique: str
) -> None:
    name = f"threads_fan_{unique}"
    with threads_worker:
        listening(task_events)
        run_id = routed.submit(fan_out(name, 0.2))
        view = routed.wait(run_id, timeout=60)
        received = messages_received(threads_worker)

    assert view["status"] == "succeeded", view["error"]
    assert received == 1, "one message for blog_post; its finish kept all three children"
    for child in CHILDREN:
        assert view["steps"][child]["attempts"] == 1
    wait_for(
        lambda: (
            {e.get("name") for e in task_events if e["type"] == "task-received"} >= {f"{name}.{c}" for c in CHILDREN}
        ),
        timeout=10,
        what="task-received events for every child",
    )
    started = {e["uuid"] for e in task_events if e["type"] == "task-started"}
    children = {e["uuid"] for e in task_events if e["type"] == "task-received" and e.get("name", "").startswith(name)}
    succeeded = {e["uuid"] for e in task_events if e["type"] == "task-succeeded"}
    wait_for(lambda: children <= started and children <= succeeded, timeout=10, what="start and end events")


def test_children_handed_to_the_threads_of_a_worker_that_is_killed_are_recovered(
    routed: Client, threads_worker: LocalWorkers, unique: str
) -> None:
    with threads_worker:
        run_id = routed.submit(fan_out(f"threads_kill_{unique}", 5.0))
        wait_for(
            lambda: all(routed.status(run_id)["steps"][c]["status"] == "running" for c in CHILDREN),
            timeout=30,
            what="every child to run",
        )
        assert messages_received(threads_worker) == 1, "all three were kept by blog_post's finish"
        (name,) = threads_worker.processes
        threads_worker.kill(name)
        # A new worker runs them again once the dead one's claims or beat lapse.
        threads_worker.processes.clear()
        threads_worker.start()
        view = routed.wait(run_id, timeout=90)

    assert view["status"] == "succeeded", view["error"]
    for child in CHILDREN:
        assert view["steps"][child]["attempts"] == 2
        assert view["steps"][child]["errors"][0]["type"] == "worker_lost"


def test_a_worker_stopping_warm_runs_the_child_it_handed_to_a_thread_before_its_pool_stops(
    routed: Client, redis_url: str, unique: str
) -> None:
    # One thread: blog_post's finish keeps one child for the slot and hands one over, which waits for the slot's
    # thread; the third goes out as a message, which this worker will not take before it stops. A lease longer than
    # the tests' 3 s: on a loaded machine the keeper's first cover of the waiting child could come after a 3 s claim
    # lease ran out (the sweeper then sends it again), which is not what this test is about.
    worker = threads_workers(routed, redis_url, 1, lease_s=15)
    with worker:
        run_id = routed.submit(fan_out(f"threads_stop_{unique}", 2.0))
        wait_for(
            lambda: [routed.status(run_id)["steps"][c]["status"] for c in CHILDREN].count("running") == 2,
            timeout=30,
            what="two children claimed by blog_post's finish",
        )
        kept = [c for c in CHILDREN if routed.status(run_id)["steps"][c]["status"] == "running"]
        worker.stop(grace=30)

    view = routed.status(run_id)
    for child in kept:
        assert (view["steps"][child]["status"], view["steps"][child]["attempts"]) == ("succeeded", 1)
