"""Agent steps on real workers: a tool loop, errors told to the model, max_turns, a killed worker, a spent budget."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestrator import Client
from orchestrator.definition.files import load_workflow_file
from orchestrator.dev.local_workers import LocalWorkers
from tests.integration.helpers import wait_for, workflow
from tests.integration.test_cli import orchestrator

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def agent(tools: list[str], script: list[list[dict[str, Any]]] | None, **params: Any) -> dict[str, Any]:
    simulate = {"simulate": {"tool_calls": script}} if script is not None else {}
    return {
        "name": "agent",
        "uses": "agent",
        "with": {"prompt": "Research tides", "max_tokens": 60, "tools": tools, **simulate, **params},
    }


def counted(label: str) -> dict[str, Any]:
    return {"name": "tests.counted", "input": {"label": label}}


def test_an_agent_loops_over_builtins_and_a_registered_tool_until_it_ends_its_turn(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    script = [
        [
            {"name": "calculator", "input": {"expression": "6*7"}},
            {"name": "notes.write", "input": {"key": "k", "value": 1}},
        ],
        [{"name": "notes.read", "input": {"key": "k"}}, counted("a")],
    ]
    step = agent(["calculator", "notes.read", "notes.write", "tests.counted"], script)

    view = client.wait(client.submit(workflow(f"agent_{unique}", step)), timeout=60)

    assert view["status"] == "succeeded", view["steps"]["agent"].get("error")
    output = view["steps"]["agent"]["output"]
    assert (output["turns"], output["stop_reason"], view["llm_calls"]) == (3, "end_turn", 3)
    assert [c.get("output") for c in output["tool_calls"]] == [
        {"result": 42},
        {"ok": True},
        {"value": 1},
        {"label": "a", "runs": 1},
    ]
    events = [e for e in client.store.events(view["run_id"]) if e.type in {"agent_turn", "tool_call"}]
    assert [e.type for e in events].count("agent_turn") == 3
    assert [e.data["name"] for e in events if e.type == "tool_call"] == [c["name"] for c in output["tool_calls"]]


def test_watch_shows_the_agents_conversation_turn_by_turn(
    redis_url: str, client: Client, workers: LocalWorkers, tmp_path: Path, unique: str
) -> None:
    script = [[{"name": "calculator", "input": {"expression": "6*7"}}]]
    path = tmp_path / "agent.json"
    step = agent(["calculator"], script, stream=True, simulate={"tool_calls": script, "latency_s": 1.0})
    path.write_text(json.dumps(workflow(f"agent_watch_{unique}", step)))
    run_id = client.submit(load_workflow_file(path))

    watched = orchestrator("watch", run_id, redis_url=redis_url)

    assert watched.returncode == 0, watched.stderr
    shown = watched.stdout
    text = client.status(run_id)["steps"]["agent"]["output"]["text"]
    assert "agent · conversation" in shown
    assert '→ calculator {"expression":"6*7"}' in shown
    assert '← calculator: {"result":42}' in shown
    assert " ".join(text.split())[:60] in " ".join(shown.split()), "the last turn's text is in the conversation"


def test_a_validation_error_is_returned_to_the_model_and_the_loop_goes_on(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    script = [
        [{"name": "calculator", "input": {"expression": 7}}],
        [{"name": "calculator", "input": {"expression": "7"}}],
    ]

    view = client.wait(client.submit(workflow(f"agent_invalid_{unique}", agent(["calculator"], script))), timeout=60)

    calls = view["steps"]["agent"]["output"]["tool_calls"]
    assert view["status"] == "succeeded"
    assert "expression" in calls[0]["error"]
    assert calls[1]["output"] == {"result": 7}


def test_an_agent_that_never_ends_its_turn_fails_once_as_max_turns(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    script = [[{"name": "calculator", "input": {"expression": "1"}}]] * 4

    view = client.wait(client.submit(workflow(f"agent_turns_{unique}", agent(["calculator"], script, max_turns=3))))

    step = view["steps"]["agent"]
    assert (view["status"], step["attempts"], step["error"]["type"]) == ("failed", 1, "max_turns")
    assert step["error"]["transcript"]["turns"] == 3
    assert view["llm_calls"] == 3


def test_a_worker_killed_in_turn_three_of_five_is_replaced_and_pays_no_turn_twice(
    client: Client, workers: LocalWorkers, redis_client: redis.Redis, unique: str
) -> None:
    script = [[counted("t1")], [counted("t2")], [counted("t3!block")], [counted("t4")]]
    run_id = client.submit(workflow(f"agent_kill_{unique}", agent(["tests.counted"], script)))
    raw = wait_for(lambda: redis_client.lindex(f"test:pids:{run_id}:agent", 0), what="the turn-3 tool to start")

    os.kill(int(str(raw).split(":")[0]), signal.SIGKILL)
    view = client.wait(run_id, timeout=90)

    step = view["steps"]["agent"]
    assert view["status"] == "succeeded", step.get("error")
    assert step["output"]["turns"] == 5
    assert view["llm_calls"] == 5, "replayed turns are answered by the reply cache"
    runs = [redis_client.get(f"test:tool:{run_id}:{label}") for label in ("t1", "t2", "t3!block", "t4")]
    assert runs == ["1", "1", "2", "1"], "finished calls never run again; the interrupted idempotent one does"
    assert step["errors"][0]["type"] == "worker_lost"


def test_a_budget_spent_mid_loop_fails_the_step_naming_the_budget_and_the_turn(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    script = [[{"name": "calculator", "input": {"expression": "1"}}]] * 6
    step = agent(["calculator"], script, max_tokens=4000, model="claude-opus-4-1")

    view = client.wait(client.submit(workflow(f"agent_budget_{unique}", step, budget_usd=0.306)), timeout=60)

    error = view["steps"]["agent"]["error"]
    assert view["status"] == "failed"
    assert error["type"] == "budget_exceeded"
    assert error["message"].startswith("agent turn ")
    assert "budget" in error["message"]
    assert 1 <= error["transcript"]["turns"] < 6


def test_a_workflow_tool_runs_a_child_and_answers_with_its_outputs_counting_its_spend(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    checker = f"fact_check_{unique}"
    summary = {"name": "verdict", "uses": "llm", "with": {"prompt": "Check {{ inputs.claim }}", "max_tokens": 40}}
    client.wait(client.submit({**workflow(checker, summary), "inputs": {"claim": {"type": "string"}}}, {"claim": "w"}))
    call = {"name": f"workflow:{checker}", "input": {"inputs": {"claim": "two tides a day"}}}
    run_id = client.submit(workflow(f"agent_child_{unique}", agent([f"workflow:{checker}"], [[call]])))
    view = client.wait(run_id, timeout=60)

    step = view["steps"]["agent"]
    assert view["status"] == "succeeded", step.get("error")
    tool_call = step["output"]["tool_calls"][0]
    assert "error" not in tool_call, tool_call
    views = [client.status(r["run_id"]) for r in client.runs(workflow=checker)]
    (child,) = [v for v in views if v.get("parent")]
    assert child["parent"] == {"run_id": run_id, "step": "agent", "index": 1000}, "turn 1's first call"
    assert tool_call["output"] == {"verdict": child["steps"]["verdict"]["output"]}
    assert child["steps"]["verdict"]["output"]["text"].startswith("Regarding")
    assert view["llm_calls"] == step["output"]["turns"] + 1, "the child's LLM call counts in the parent's"


def test_the_research_team_example_runs_on_workers_with_its_fact_check_child_run_linked(
    client: Client, workers: LocalWorkers
) -> None:
    examples = Path(__file__).resolve().parents[2] / "examples"
    client.wait(client.submit(load_workflow_file(examples / "fact_check.yaml"), {"claim": "two tides a day"}))

    run_id = client.submit(load_workflow_file(examples / "research_team.yaml"), {"topic": "tides"})
    view = client.wait(run_id, timeout=90)

    assert view["status"] == "succeeded", view["error"]
    supervisor = view["steps"]["supervisor"]
    (call,) = [c for c in supervisor["output"]["tool_calls"] if c["name"] == "workflow:fact_check"]
    children = [client.status(r["run_id"]) for r in client.runs(workflow="fact_check")]
    (child,) = [c for c in children if (c.get("parent") or {}).get("run_id") == run_id]
    assert child["status"] == "succeeded"
    assert child["parent"]["step"] == "supervisor"
    assert call["output"] == {"verdict": child["steps"]["verdict"]["output"]}
    assert view["llm_calls"] > supervisor["output"]["turns"], "the child's turns count in the parent's"
