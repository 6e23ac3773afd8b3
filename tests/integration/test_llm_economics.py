"""LLM spend on real workers: budgets, cluster-wide pacing, shared cool-downs, replies never paid for twice."""

from __future__ import annotations

import pytest

from orchestrator import Client
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.state import keys
from tests.integration.helpers import llm, py, ts, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def _events(client: Client, run_id: str, kind: str) -> list[object]:
    return [e for e in client.store.events(run_id) if e.type == kind]  # type: ignore[attr-defined]


def test_a_spent_budget_fails_the_next_llm_step_and_starts_no_other_call(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    big = {"max_tokens": 1000}
    spec = workflow(
        f"budget_{unique}",
        llm("first"),
        llm("second", "first"),
        py("tidy", "tests.sleep", "first"),
        llm("third", "tidy"),
        budget_usd=0.007,  # first may cost up to $0.005 at Haiku prices; then $0.005 more could pass $0.007
    )
    for step in spec["steps"]:
        if step["uses"] == "llm":
            step["with"].update(big)
    view = client.wait(client.submit(spec), timeout=60)

    steps = view["steps"]
    assert view["status"] == "failed"
    assert steps["first"]["status"] == "succeeded"
    assert steps["tidy"]["status"] == "succeeded", "python steps are not stopped by the LLM budget"
    for name in ("second", "third"):
        assert steps[name]["status"] == "failed"
        assert steps[name]["error"]["type"] == "budget_exceeded"
        assert steps[name]["error"]["retryable"] is False
        assert steps[name]["attempts"] == 1
    assert view["llm_calls"] == 1
    assert view["cost"] == pytest.approx(steps["first"]["cost"], abs=1e-9)
    assert 0 < view["cost"] <= 0.007
    assert view["budget"] == {"budget_usd": 0.007, "held_usd": 0.0, "exhausted": True}


def test_cost_is_reported_per_step_and_per_run(client: Client, workers: LocalWorkers, unique: str) -> None:
    spec = workflow(f"cost_{unique}", llm("a"), llm("b", "a"))
    run_id = client.submit(spec)
    view = client.wait(run_id, timeout=60)

    assert view["status"] == "succeeded"
    for name in ("a", "b"):
        usage = view["steps"][name]["usage"]
        expected = (usage["input_tokens"] * 1.0 + usage["output_tokens"] * 5.0) / 1e6  # Haiku 4.5 list prices
        assert view["steps"][name]["cost"] == pytest.approx(expected)
    assert view["cost"] == pytest.approx(view["steps"]["a"]["cost"] + view["steps"]["b"]["cost"], abs=1e-9)
    assert view["llm_calls"] == 2
    assert "budget" not in view
    succeeded = {e.step: e.data for e in _events(client, run_id, "step_succeeded")}  # type: ignore[attr-defined]
    assert succeeded["a"] == {"usage": view["steps"]["a"]["usage"], "cost_usd": view["steps"]["a"]["cost"]}


def test_paced_calls_are_deferred_without_failing_or_holding_worker_slots(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    # claude-test-paced admits one request a second, cluster-wide (tests/conftest.py WORKER_ENV); four slots.
    paced = [llm(f"call{i}", model="claude-test-paced") for i in range(5)]
    for step in paced:
        step["with"]["model"] = step.pop("model")
    spec = workflow(f"paced_{unique}", *paced, py("quick", "tests.sleep", seconds=0.2))
    run_id = client.submit(spec)
    view = client.wait(run_id, timeout=60)

    steps = view["steps"]
    assert view["status"] == "succeeded"
    calls = [steps[f"call{i}"] for i in range(5)]
    assert all(c["attempts"] == 1 for c in calls), "waiting for the limit is not a failed attempt"
    assert sum(c.get("deferrals", 0) for c in calls) >= 4
    starts = sorted(ts(c["started_at"]) for c in calls)
    assert starts[-1] - starts[0] >= 3.0, "five calls at one a second span at least four seconds"
    assert ts(steps["quick"]["finished_at"]) < starts[-1], "deferred steps left the worker slots free"
    assert len(_events(client, run_id, "step_deferred")) == sum(c["deferrals"] for c in calls if "deferrals" in c)


def test_a_retry_after_pauses_other_steps_calls_to_that_model(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    model = f"claude-test-cool-{unique}"
    first = llm("limited", errors=("rate_limit",), retry_after_s=3, retry={"max_attempts": 3, "backoff_s": 0.1})
    second = llm("bystander", "pause")
    for step in (first, second):
        step["with"]["model"] = model
    spec = workflow(f"cool_{unique}", first, py("pause", "tests.sleep", seconds=1.0), second)
    run_id = client.submit(spec)
    view = client.wait(run_id, timeout=60)

    steps = view["steps"]
    assert view["status"] == "succeeded"
    assert steps["limited"]["attempts"] == 2
    assert steps["bystander"]["attempts"] == 1, "the bystander never got a 429 of its own"
    assert steps["bystander"]["deferrals"] >= 1
    limited_at = _events(client, run_id, "step_retry")[0].ts  # type: ignore[attr-defined]
    assert ts(steps["bystander"]["started_at"]) >= limited_at + 2.9


def test_an_identical_request_in_a_run_is_paid_once_and_resume_from_asks_again(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    same = "Summarise {{ inputs.topic }} in one line"
    a, b = llm("a"), llm("b", "a")
    a["with"]["prompt"] = b["with"]["prompt"] = same
    run_id = client.submit(workflow(f"dedup_{unique}", a, b))
    view = client.wait(run_id, timeout=60)

    assert view["status"] == "succeeded"
    assert view["llm_calls"] == 1
    assert view["steps"]["b"]["output"]["reply_cached"] is True
    assert view["steps"]["b"]["cost"] == 0.0
    assert view["steps"]["b"]["output"]["text"] == view["steps"]["a"]["output"]["text"]

    client.resume(run_id, from_step="b")
    again = client.wait(run_id, timeout=60)
    assert again["status"] == "succeeded"
    assert again["llm_calls"] == 2, "resume --from asks the model again"
    assert "reply_cached" not in again["steps"]["b"]["output"]


def test_a_succeeded_run_drops_its_reply_cache_and_a_failed_one_keeps_it_for_resume(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    succeeded = client.wait(client.submit(workflow(f"drop_{unique}", llm("a"))), timeout=60)
    failed = client.wait(client.submit(workflow(f"keep_{unique}", llm("a"), py("b", "tests.fail", "a"))), timeout=60)

    assert (succeeded["status"], failed["status"]) == ("succeeded", "failed")
    redis_client = client.store.client  # type: ignore[attr-defined]
    assert redis_client.exists(keys.llm_run_cache_key(succeeded["run_id"])) == 0
    assert redis_client.hlen(keys.llm_run_cache_key(failed["run_id"])) == 1
    assert redis_client.ttl(keys.llm_run_cache_key(failed["run_id"])) > 0


def test_replies_are_shared_across_runs_only_when_opted_in(client: Client, workers: LocalWorkers, unique: str) -> None:
    step = llm("ask")
    step["with"]["reply_cache"] = "shared"
    spec = workflow(f"shared_{unique}", step)
    first = client.wait(client.submit(spec), timeout=60)
    second = client.wait(client.submit(spec), timeout=60)
    private = client.wait(client.submit(workflow(f"private_{unique}", llm("ask"))), timeout=60)

    assert first["llm_calls"] == 1
    assert second["llm_calls"] == 0
    assert second["steps"]["ask"]["output"]["reply_cached"] is True
    assert private["llm_calls"] == 1
