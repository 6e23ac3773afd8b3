"""Priorities by depth with a real worker: a run in flight finishes before the runs queued behind it start.

A backlog of three-step chains is queued while no worker consumes the queue; then one prefork worker with one slot
starts. It takes one message at a time (prefetch 1, late acks), and each step publishes its child before its own
message is acknowledged, so the next message it takes is decided by the queue's order alone: with
``ORCH_PRIORITIES=depth`` the child of the run in flight, with ``off`` the oldest root. The order is read from each
step's recorded ``started_at``, not from timing.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import redis

from orchestrator import Client, Settings
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.engine.priorities import REDIS_PRIORITY_SEPARATOR
from tests.conftest import ARTIFACTS, WORKER_ENV
from tests.integration.helpers import queue_length, ts, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RUNS = 3
CHAIN = ("a", "b", "c")


def chain(name: str) -> dict[str, object]:
    return workflow(
        name, *({"name": s, "uses": "noop", "depends_on": [CHAIN[i - 1]] if i else []} for i, s in enumerate(CHAIN))
    )


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("depth", [(run, step) for run in range(RUNS) for step in CHAIN]),
        ("off", [(run, step) for step in CHAIN for run in range(RUNS)]),
    ],
    ids=["depth-finishes-each-run-before-starting-the-next", "off-runs-every-root-first"],
)
def test_one_slot_takes_the_deeper_step_of_a_run_in_flight_before_the_roots_queued_before_it(
    *,
    mode: str,
    expected: list[tuple[int, str]],
    settings: Settings,
    redis_url: str,
    redis_client: redis.Redis,
    unique: str,
) -> None:
    llm_queue, cpu_queue = f"llm_{unique}", f"cpu_{unique}"
    client = Client(replace(settings, llm_queue=llm_queue, cpu_queue=cpu_queue, priorities=mode))
    env = {
        "REDIS_URL": redis_url,
        **WORKER_ENV,
        "ORCH_LLM_QUEUE": llm_queue,
        "ORCH_CPU_QUEUE": cpu_queue,
        "ORCH_PRIORITIES": mode,
    }
    log_dir = ARTIFACTS / "worker-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    spec = chain(f"prio_{unique}")

    run_ids = [client.submit(spec) for _ in range(RUNS)]

    assert queue_length(redis_client, cpu_queue) == RUNS
    # The roots wait on the list taken last (priority 9) with priorities on, on the queue's own list without.
    lowest = f"{cpu_queue}{REDIS_PRIORITY_SEPARATOR}9"
    assert redis_client.llen(lowest if mode == "depth" else cpu_queue) == RUNS
    with LocalWorkers(
        client.app, count=1, pool="prefork", concurrency=1, queues=(cpu_queue,), env=env, log_dir=log_dir
    ):
        views = [client.wait(run_id, timeout=60) for run_id in run_ids]

    assert [v["status"] for v in views] == ["succeeded"] * RUNS
    started = sorted((ts(v["steps"][s]["started_at"]), i, s) for i, v in enumerate(views) for s in CHAIN)
    assert [(i, s) for _, i, s in started] == expected
    assert queue_length(redis_client, cpu_queue) == 0
