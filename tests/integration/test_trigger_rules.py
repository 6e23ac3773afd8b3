"""Early-firing trigger rules on real workers: a ``one_success`` join starts before its slow parent ends, is released
exactly once when its parents finish together, and a hedged request with ``cancel_others`` stops paying for the
loser."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from orchestrator.client import Client
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.state import keys
from tests.integration.helpers import llm, py, ts, workflow

pytestmark = pytest.mark.timeout(90)


def _join(name: str, *parents: str, rule: str = "one_success", **extra: Any) -> dict[str, Any]:
    return {**py(name, "tests.count_calls", *parents), "trigger_rule": rule, **extra}


def test_a_one_success_join_starts_before_its_slow_parent_ends(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    spec = workflow(
        f"early_{unique}",
        py("fast", "tests.sleep", seconds=0.3),
        py("slow", "tests.sleep", seconds=5.0),
        _join("join", "fast", "slow"),
    )
    view = client.wait(client.submit(spec), timeout=60)

    steps = view["steps"]
    assert view["status"] == "succeeded"
    assert {s: steps[s]["status"] for s in ("fast", "slow", "join")} == dict.fromkeys(
        ("fast", "slow", "join"), "succeeded"
    )
    assert ts(steps["join"]["started_at"]) < ts(steps["slow"]["finished_at"])
    assert ts(steps["join"]["finished_at"]) < ts(steps["slow"]["finished_at"])


def test_parents_finishing_together_release_their_join_exactly_once(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    run_ids = [
        client.submit(
            workflow(
                f"together_{unique}_{i}",
                py("left", "tests.sleep", seconds=0.2),
                py("right", "tests.sleep", seconds=0.2),
                _join("join", "left", "right"),
            )
        )
        for i in range(4)
    ]
    for run_id in run_ids:
        view = client.wait(run_id, timeout=60)
        assert view["status"] == "succeeded"
        assert view["steps"]["join"]["attempts"] == 1
        assert view["steps"]["join"]["output"]["calls"] == 1
        events = redis_client.xrange(keys.events_key(run_id))
        queued = [f for _, f in events if f["type"] == "step_queued" and f["step"] == "join"]
        started = [f for _, f in events if f["type"] == "step_started" and f["step"] == "join"]
        assert (len(queued), len(started)) == (1, 1), run_id


def test_a_hedged_request_cancels_the_slower_model_and_the_run_pays_for_both(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    # The slow model's first reply is invalid JSON (paid for); its repair call takes 4 s. The fast model is asked
    # once that first call is paid, so the race is decided by what was spent, not by a timing margin.
    slow = llm("slow", latency=2.0)
    slow["with"] |= {"output_schema": {"type": "object", "required": ["answer"]}}
    slow["with"]["simulate"] |= {"output": "not json at all", "latency_s": 2.0}
    slow["retry"] = {"max_attempts": 1}
    gate = py("gate", "tests.wait_for_llm_calls", calls=1)
    fast = llm("fast", "gate", latency=0.1)
    hedge = {**_join("answer", "fast", "slow"), "cancel_others": True}
    run_id = client.submit(workflow(f"hedge_{unique}", slow, gate, fast, hedge))

    view = client.wait(run_id, timeout=60)

    steps = view["steps"]
    assert view["status"] == "succeeded"
    assert (steps["fast"]["status"], steps["answer"]["status"], steps["slow"]["status"]) == (
        "succeeded",
        "succeeded",
        "cancelled",
    )
    assert ts(steps["slow"]["finished_at"]) <= ts(steps["answer"]["started_at"])
    # Both models were paid: the fast one's reply and the slow one's first (invalid) reply; its repair was stopped.
    fast_cost = steps["fast"]["output"]["cost_usd"]
    assert view["llm_calls"] == 2
    assert view["cost"] > fast_cost > 0
