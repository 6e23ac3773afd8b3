"""Repeated steps on real workers: a draft → critique loop, running out of iterations, and a worker killed mid-loop."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import redis

from orchestrator import Client
from orchestrator.dev.local_workers import LocalWorkers
from tests.integration.helpers import py, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DRAFT_THEN_CRITIQUE = (
    "{% if previous %}CRITIQUE and revise this draft: {{ previous.text }}"
    "{% else %}Draft a paragraph about {{ inputs.topic }}{% endif %}"
)


def critique_loop(name: str, until: str, max_iterations: int, **repeat: Any) -> dict[str, Any]:
    step = {
        "name": "draft",
        "uses": "llm",
        "with": {"prompt": DRAFT_THEN_CRITIQUE, "max_tokens": 80},
        "repeat": {"until": until, "max_iterations": max_iterations, **repeat},
    }
    return workflow(name, step, {"name": "publish", "uses": "noop", "depends_on": ["draft"]})


def test_a_draft_then_critique_loop_stops_when_until_holds_at_the_second_iteration(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    spec = critique_loop(f"critique_{unique}", "'CRITIQUE' in output.text", 5)

    view = client.wait(client.submit(spec), timeout=60)

    step = view["steps"]["draft"]
    assert view["status"] == "succeeded"
    assert (step["iterations"], step["until_met"], step["attempts"]) == (2, True, 1)
    assert step["output"]["text"].startswith('Regarding "CRITIQUE and revise this')
    assert view["llm_calls"] == 2
    told = [e.data for e in client.store.events(view["run_id"]) if e.type == "step_iteration"]
    assert told == [{"iteration": 1, "until_met": False}, {"iteration": 2, "until_met": True}]


def test_a_loop_that_runs_out_of_iterations_succeeds_with_until_not_met(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    spec = critique_loop(f"exhaust_{unique}", "output.word_count > 100000", 3)

    view = client.wait(client.submit(spec), timeout=60)

    step = view["steps"]["draft"]
    assert view["status"] == "succeeded"
    assert (step["iterations"], step["until_met"]) == (3, False)
    assert view["steps"]["publish"]["status"] == "succeeded"
    assert view["llm_calls"] == 3


def test_a_loop_that_runs_out_with_on_exhausted_fail_fails_once_as_max_iterations(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    spec = critique_loop(f"exhaust_fail_{unique}", "output.word_count > 100000", 2, on_exhausted="fail")

    view = client.wait(client.submit(spec), timeout=60)

    step = view["steps"]["draft"]
    assert view["status"] == "failed"
    assert step["error"] is not None
    assert (step["error"]["type"], step["attempts"], step["iterations"]) == ("max_iterations", 1, 2)
    assert view["steps"]["publish"]["status"] == "upstream_failed"
    assert view["llm_calls"] == 2


def test_a_worker_killed_during_the_third_of_four_iterations_is_replaced_from_the_second_checkpoint(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    step = py("loop", "tests.iterate", block_in=3)
    step["repeat"] = {"until": "output.n >= 4", "max_iterations": 4}
    run_id = client.submit(workflow(f"kill_loop_{unique}", step))
    raw = wait_for(lambda: redis_client.lindex(f"test:pids:{run_id}:loop", 0), what="iteration 3 to start")

    os.kill(int(str(raw).split(":")[0]), signal.SIGKILL)
    view = client.wait(run_id, timeout=60)

    loop = view["steps"]["loop"]
    assert view["status"] == "succeeded"
    assert (loop["iterations"], loop["until_met"], loop["output"]["seen"]) == (4, True, [1, 2, 3, 4])
    assert loop["errors"][0]["type"] == "worker_lost"
    runs = [redis_client.get(f"test:iterations:{run_id}:loop:{i}") for i in (1, 2, 3, 4)]
    assert runs == ["1", "1", "2", "1"], "iterations 1 and 2 were checkpointed: never run again"


def test_iterations_asking_the_same_prompt_each_get_a_reply_of_their_own(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    step = {
        "name": "sample",
        "uses": "llm",
        "with": {"prompt": "Suggest a title about {{ inputs.topic }}", "max_tokens": 30},
        "repeat": {"until": "output.word_count > 100000", "max_iterations": 3},
    }

    view = client.wait(client.submit(workflow(f"sample_{unique}", step)), timeout=60)

    assert view["status"] == "succeeded"
    assert view["steps"]["sample"]["iterations"] == 3
    assert view["llm_calls"] == 3, "the reply cache answers a repeated request within an iteration, not across them"
