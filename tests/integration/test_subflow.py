"""Sub-workflows on real workers: outputs, links, failure, resume, cancel, deadline, idempotency."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from orchestrator import Client
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.engine.runtime import build_runtime
from orchestrator.engine.subflow import start_child
from tests.integration.helpers import llm, py, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def compose(name: str, with_: dict[str, Any], *deps: str) -> dict[str, Any]:
    return {"name": name, "uses": "workflow", "depends_on": list(deps), "with": with_}


def child(name: str, *steps: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "inputs": {"text": {"type": "string"}}, "steps": list(steps)}


SUMMARY = {"name": "summary", "uses": "llm", "with": {"prompt": "Summarise {{ inputs.text }}", "max_tokens": 40}}


def test_children_by_name_and_inline_feed_their_outputs_downstream_and_link_both_ways(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    named = f"channel_{unique}"
    client.wait(client.submit(child(named, SUMMARY), {"text": "warm up"}), timeout=30)  # submitted as a file
    inline = child(f"inline_{unique}", {**SUMMARY, "name": "digest"})
    spec = workflow(
        f"parent_{unique}",
        llm("draft"),
        compose("by_name", {"workflow": named, "inputs": {"text": "{{ steps.draft.output.text }}"}}, "draft"),
        compose("inline", {"definition": inline, "inputs": {"text": "{{ inputs.topic }}"}}),
        {
            "name": "publish",
            "uses": "llm",
            "depends_on": ["by_name", "inline"],
            "with": {"prompt": "Publish {{ steps.by_name.output.summary.text }}", "max_tokens": 40},
        },
    )

    run_id = client.submit(spec)
    view = client.wait(run_id, timeout=40)

    assert view["status"] == "succeeded", view
    for step, inner in (("by_name", "summary"), ("inline", "digest")):
        child_id = view["steps"][step]["child_run_id"]
        child_view = client.status(child_id)
        assert child_view["parent"] == {"run_id": run_id, "step": step, "index": None}
        assert view["steps"][step]["output"] == {inner: child_view["steps"][inner]["output"]}
    assert client.status(view["steps"]["by_name"]["child_run_id"])["workflow"] == named
    assert view["steps"]["publish"]["output"]["text"].startswith('Regarding "Publish Regarding Summarise')
    # Both children's LLM calls count in the parent's cost.
    assert view["llm_calls"] == 4


def test_a_failing_child_fails_the_parent_step_and_resume_resumes_the_same_child(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    inline = child(f"gated_{unique}", py("work", "tests.gate"))
    spec = workflow(f"fails_{unique}", compose("compose", {"definition": inline, "inputs": {"text": "x"}}))
    run_id = client.submit(spec)

    view = client.wait(run_id, timeout=30)
    child_id = view["steps"]["compose"]["child_run_id"]
    error = view["steps"]["compose"]["error"]
    assert view["status"] == "failed"
    assert error is not None
    assert error["child_run_id"] == child_id
    assert f"child run {child_id}" in error["message"]
    assert "the cause is not fixed yet" in error["message"]

    redis_client.set(f"test:fixed:{child_id}", "1", ex=300)
    client.resume(run_id)
    view = client.wait(run_id, timeout=30)

    assert view["status"] == "succeeded", view
    assert view["steps"]["compose"]["child_run_id"] == child_id
    assert client.status(child_id)["generation"] == 2
    assert view["steps"]["compose"]["output"] == {"work": {"fixed": True}}


def test_cancelling_a_parent_cancels_its_running_child(client: Client, workers: LocalWorkers, unique: str) -> None:
    inline = child(f"slow_{unique}", py("work", "tests.sleep", seconds=20))
    run_id = client.submit(
        workflow(f"cancel_{unique}", compose("compose", {"definition": inline, "inputs": {"text": "x"}}))
    )
    child_id = wait_for(lambda: client.status(run_id)["steps"]["compose"].get("child_run_id"), what="the child")
    wait_for(lambda: client.status(child_id)["steps"]["work"]["status"] == "running", what="the child's step to run")
    assert client.status(run_id)["status"] == "waiting"

    client.cancel(run_id)

    assert client.status(child_id)["status"] == "cancelled"
    assert client.status(child_id)["steps"]["work"]["status"] == "cancelled"
    assert client.status(run_id)["status"] == "cancelled"


def test_the_parents_deadline_reaches_the_child(client: Client, workers: LocalWorkers, unique: str) -> None:
    inline = child(f"late_{unique}", py("work", "tests.sleep", seconds=20))  # no timeout of its own
    spec = workflow(
        f"deadline_{unique}", compose("compose", {"definition": inline, "inputs": {"text": "x"}}), timeout_s=2
    )

    view = client.wait(client.submit(spec), timeout=30)

    child_id = view["steps"]["compose"]["child_run_id"]
    assert view["status"] == "timed_out"
    assert client.wait(child_id, timeout=10)["status"] == "timed_out"


def test_a_repeated_start_of_the_same_parent_step_finds_the_child_it_started(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    inline = child(f"once_{unique}", py("work", "tests.count_calls"))
    run_id = client.submit(
        workflow(f"parent_once_{unique}", compose("compose", {"definition": inline, "inputs": {"text": "x"}}))
    )
    view = client.wait(run_id, timeout=30)
    child_id = view["steps"]["compose"]["child_run_id"]

    # What a redelivered attempt of the same generation does (its worker killed after creating the child).
    runtime = build_runtime(client.settings, client.publisher)
    again = start_child(
        runtime, run_id, "compose", None, ref=client.resolve(inline), inputs={"text": "x"}, generation="1"
    )

    assert again == child_id
    assert client.status(child_id)["generation"] == 1
    assert client.status(child_id)["steps"]["work"]["output"]["calls"] == 1


def test_a_workflow_map_runs_a_child_per_channel_and_counts_their_spend(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    named = f"channel_post_{unique}"
    post = {"name": "post", "uses": "llm", "with": {"prompt": "Post {{ inputs.text }} on {{ inputs.channel }}"}}
    channel_post = {
        "name": named,
        "inputs": {"text": {"type": "string"}, "channel": {"type": "string"}},
        "steps": [{**post, "with": {**post["with"], "max_tokens": 40}}],
    }
    client.wait(client.submit(channel_post, {"text": "warm up", "channel": "none"}), timeout=30)  # as a file
    per_channel = {
        "name": "per_channel",
        "uses": "workflow",
        "depends_on": ["draft"],
        "for_each": "['blog', 'email']",
        "with": {"workflow": named, "inputs": {"channel": "{{ item }}", "text": "{{ inputs.topic }}"}},
    }

    run_id = client.submit(workflow(f"parent_{unique}", llm("draft"), per_channel))
    view = client.wait(run_id, timeout=40)

    assert view["status"] == "succeeded", view
    output = view["steps"]["per_channel"]["output"]
    # The offline provider echoes the prompt's start: each child rendered its own item.
    assert output[0]["post"]["text"].startswith('Regarding "Post tests on blog')
    assert output[1]["post"]["text"].startswith('Regarding "Post tests on email')
    records = client.items(run_id, "per_channel")["items"]
    for index, record in enumerate(records):
        child_view = client.status(record["child_run_id"])
        assert child_view["parent"] == {"run_id": run_id, "step": "per_channel", "index": index}
        assert child_view["inputs"]["channel"] == ["blog", "email"][index]
        assert output[index] == {"post": child_view["steps"]["post"]["output"]}
    # Each child's LLM call counts once in the parent's cost: the draft's and one per channel.
    assert view["llm_calls"] == 3


def test_a_repeated_workflow_step_runs_one_child_per_iteration_each_seeing_the_previous(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    inline = child(f"round_{unique}", SUMMARY)
    text = "Round {{ iteration }} after {{ previous.summary.text if previous else 'nothing' }}"
    loop = {
        **compose("rounds", {"definition": inline, "inputs": {"text": text}}),
        "repeat": {"until": "'Round 3' in output.summary.text", "max_iterations": 5},
    }
    spec = workflow(f"rounds_{unique}", loop, {"name": "after", "uses": "noop", "depends_on": ["rounds"]})

    run_id = client.submit(spec)
    view = client.wait(run_id, timeout=50)

    assert view["status"] == "succeeded", view
    step = view["steps"]["rounds"]
    assert (step["iterations"], step["until_met"]) == (3, True)
    children = [e.data["child_run_id"] for e in client.store.events(run_id) if e.type == "step_waiting"]
    assert len(children) == len(set(children)) == 3, "one child run per iteration, none started twice"
    texts = [client.status(c)["inputs"]["text"] for c in children]
    assert texts[0] == "Round 1 after nothing"
    assert texts[1].startswith('Round 2 after Regarding "Summarise Round 1 after nothing')
    assert [client.status(c)["parent"]["index"] for c in children] == [1, 2, 3]
    assert step["output"] == {"summary": client.status(children[2])["steps"]["summary"]["output"]}
    iterations = [e.data["iteration"] for e in client.store.events(run_id) if e.type == "step_iteration"]
    assert iterations == [1, 2, 3], "each finished iteration checkpointed once"
