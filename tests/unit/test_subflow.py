"""Sub-workflows (``uses: workflow``) validated at submit and run end to end on the in-memory backend.

The ``memory://`` client is the whole system (store, step threads, sweeper), so these drive the same engine code as
real workers, against :class:`~orchestrator.state.MemoryStateStore`.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from orchestrator import Client, Settings
from orchestrator.definition.registry import functions, workflows
from orchestrator.definition.spec import parse_workflow
from orchestrator.definition.subflow import check_subflows
from orchestrator.domain import Attempt, ChildTotals, ParentLink
from orchestrator.engine.steps import StepContext
from orchestrator.errors import UnknownWorkflowError, WorkflowDefinitionError
from orchestrator.state import MemoryStateStore
from tests.unit.test_memory_backend import poll

SETTINGS = replace(Settings.from_env({}), redis_url="memory://", sweep_interval_s=0.05, retry_cap_s=1.0)


@pytest.fixture
def client() -> Iterator[Client]:
    with Client(SETTINGS) as c:
        yield c


def name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def child_workflow(wf: str, *, fail: bool = False) -> dict[str, Any]:
    """A child taking ``text``: an LLM step over it (or a failing python step)."""
    step: dict[str, Any] = {
        "name": "summary",
        "uses": "llm",
        "with": {"prompt": "Summarise {{ inputs.text }}", "max_tokens": 40},
    }
    if fail:
        step = {"name": "summary", "uses": "python", "with": {"function": _failing}}
    return {"name": wf, "inputs": {"text": {"type": "string"}}, "steps": [step]}


def parent_workflow(wf: str, child: dict[str, Any]) -> dict[str, Any]:
    """draft (llm) → compose (the child, fed the draft) → publish (llm reading the child's output)."""
    return {
        "name": wf,
        "inputs": {"topic": {"type": "string", "default": "tests"}},
        "steps": [
            {"name": "draft", "uses": "llm", "with": {"prompt": "Draft about {{ inputs.topic }}", "max_tokens": 40}},
            {"name": "compose", "uses": "workflow", "depends_on": ["draft"], "with": child},
            {
                "name": "publish",
                "uses": "llm",
                "depends_on": ["compose"],
                "with": {"prompt": "Publish {{ steps.compose.output.summary.text }}", "max_tokens": 40},
            },
        ],
    }


def _fail(ctx: StepContext) -> None:
    raise ValueError("the child is broken on purpose")


_failing = f"subflow_test.fail_{uuid.uuid4().hex[:8]}"
functions.register(_fail, _failing)


# -- validation -----------------------------------------------------------------------------------------------------


def _lookup(known: dict[str, dict[str, Any]]) -> Any:
    def find(wf: str, version: int | None) -> Any:
        if wf not in known:
            raise UnknownWorkflowError(wf, version)
        return parse_workflow(known[wf])

    return find


def calls(wf: str, target: str) -> dict[str, Any]:
    return {"name": wf, "steps": [{"name": "call", "uses": "workflow", "with": {"workflow": target}}]}


def test_a_workflow_step_naming_an_unknown_workflow_is_refused_at_submit(client: Client) -> None:
    spec = parent_workflow(name("p"), {"workflow": name("nobody"), "inputs": {"text": "x"}})

    with pytest.raises(WorkflowDefinitionError, match=r"step 'compose': no registered workflow 'nobody_"):
        client.submit(spec)

    assert client.runs() == []


def test_a_workflow_that_calls_itself_through_another_is_refused_naming_the_cycle() -> None:
    known = {"a": calls("a", "b"), "b": calls("b", "a")}

    with pytest.raises(WorkflowDefinitionError, match=r"workflow 'a' calls itself \(a -> b -> a\)"):
        check_subflows(parse_workflow(known["a"]), _lookup(known))


def test_runs_nested_deeper_than_the_limit_are_refused() -> None:
    known = {f"w{i}": calls(f"w{i}", f"w{i + 1}") for i in range(6)}
    known["w6"] = {"name": "w6", "steps": [{"name": "x", "uses": "noop"}]}

    check_subflows(parse_workflow(known["w2"]), _lookup(known), max_depth=5)
    with pytest.raises(WorkflowDefinitionError, match=r"runs nest 6 deep \(w0 -> w1 -> .* -> w5\); the limit is 5"):
        check_subflows(parse_workflow(known["w0"]), _lookup(known), max_depth=5)


def test_an_invalid_inline_definition_is_refused_naming_the_step_and_the_inner_problem(client: Client) -> None:
    inline = {
        "name": "inner",
        "steps": [{"name": "a", "uses": "llm", "depends_on": ["ghost"], "with": {"prompt": "x"}}],
    }

    with pytest.raises(WorkflowDefinitionError, match=r"step 'compose': with.definition: .*ghost"):
        client.submit(parent_workflow(name("p"), {"definition": inline}))


def test_workflow_and_definition_together_are_refused() -> None:
    both = {"workflow": "x", "definition": {"name": "y", "steps": [{"name": "a", "uses": "noop"}]}}

    with pytest.raises(WorkflowDefinitionError, match="exactly one"):
        parse_workflow(parent_workflow("p", both))


def test_repeat_on_a_workflow_step_runs_a_child_per_iteration_until_it_holds(client: Client) -> None:
    inline = child_workflow(name("round"))
    text = "Round {{ iteration }} after {{ previous.summary.text if previous else 'nothing' }}"
    spec = parent_workflow(name("p"), {"definition": inline, "inputs": {"text": text}})
    spec["steps"][1]["repeat"] = {"until": "'Round 2' in output.summary.text", "max_iterations": 4}

    run_id = client.submit(spec)
    view = client.wait(run_id, timeout=30)

    assert view["status"] == "succeeded", view
    assert (view["steps"]["compose"]["iterations"], view["steps"]["compose"]["until_met"]) == (2, True)
    children = [e.data["child_run_id"] for e in client.store.events(run_id) if e.type == "step_waiting"]
    assert len(set(children)) == 2
    assert client.status(children[1])["inputs"]["text"].startswith("Round 2 after Regarding")
    with pytest.raises(WorkflowDefinitionError, match="repeat is not supported on approval steps"):
        parse_workflow(
            {
                "name": "a",
                "steps": [
                    {
                        "name": "r",
                        "uses": "approval",
                        "with": {"approvers": ["x"]},
                        "repeat": {"until": "true", "max_iterations": 2},
                    }
                ],
            }
        )


# -- runs on the in-memory backend ------------------------------------------------------------------------------------


def test_an_inline_child_runs_and_its_outputs_feed_the_next_step(client: Client) -> None:
    inline = {**child_workflow(name("inline")), "inputs": {"text": {"type": "string"}}}
    run_id = client.submit(
        parent_workflow(name("p"), {"definition": inline, "inputs": {"text": "{{ steps.draft.output.text }}"}})
    )

    view = client.wait(run_id, timeout=15)

    assert view["status"] == "succeeded", view
    compose = view["steps"]["compose"]
    child_id = compose["child_run_id"]
    child = client.status(child_id)
    assert child["status"] == "succeeded"
    assert child["parent"] == {"run_id": run_id, "step": "compose", "index": None}
    assert compose["output"] == {"summary": child["steps"]["summary"]["output"]}
    assert child["inputs"] == {"text": view["steps"]["draft"]["output"]["text"]}
    # The offline provider echoes the prompt's start: publish read the child's summary, which read the draft.
    assert compose["output"]["summary"]["text"].startswith('Regarding "Summarise Regarding')
    assert view["steps"]["publish"]["output"]["text"].startswith('Regarding "Publish Regarding Summarise')


def test_a_child_by_registered_name_runs_at_the_pinned_version(client: Client) -> None:
    wf = name("registered")
    workflows.register(parse_workflow({**child_workflow(wf), "version": 1}))
    v2 = child_workflow(wf)
    v2["steps"][0]["with"]["prompt"] = "Version two of {{ inputs.text }}"
    workflows.register(parse_workflow({**v2, "version": 2}))

    run_id = client.submit(parent_workflow(name("p"), {"workflow": wf, "version": 1, "inputs": {"text": "hi"}}))
    view = client.wait(run_id, timeout=15)

    assert view["status"] == "succeeded", view
    child = client.status(view["steps"]["compose"]["child_run_id"])
    assert (child["workflow"], child["version"]) == (wf, 1)


def test_a_failing_child_fails_the_step_naming_the_child_and_resume_resumes_the_same_child(client: Client) -> None:
    broken = threading.Event()
    broken.set()
    fn = f"subflow_test.gate_{uuid.uuid4().hex[:8]}"

    def gate(ctx: StepContext) -> dict[str, Any]:
        if broken.is_set():
            raise ValueError("the cause is not fixed yet")
        return {"fixed": True}

    functions.register(gate, fn)
    inline = {"name": "gated", "steps": [{"name": "work", "uses": "python", "with": {"function": fn}}]}
    run_id = client.submit(
        {"name": name("p"), "steps": [{"name": "compose", "uses": "workflow", "with": {"definition": inline}}]}
    )

    view = client.wait(run_id, timeout=15)
    child_id = view["steps"]["compose"]["child_run_id"]
    error = view["steps"]["compose"]["error"]
    assert view["status"] == "failed"
    assert error is not None
    assert error["child_run_id"] == child_id
    assert f"child run {child_id} (gated) failed" in error["message"]
    assert "the cause is not fixed yet" in error["message"]

    broken.clear()
    client.resume(run_id)
    view = client.wait(run_id, timeout=15)

    assert view["status"] == "succeeded", view
    assert view["steps"]["compose"]["child_run_id"] == child_id
    child = client.status(child_id)
    assert (child["status"], child["generation"]) == ("succeeded", 2)
    assert view["steps"]["compose"]["output"] == {"work": {"fixed": True}}


def test_cancelling_the_parent_cancels_its_running_child(client: Client) -> None:
    entered, release = threading.Event(), threading.Event()
    fn = f"subflow_test.block_{uuid.uuid4().hex[:8]}"

    def block(ctx: StepContext) -> None:
        entered.set()
        release.wait(15)

    functions.register(block, fn)
    inline = {"name": "blocking", "steps": [{"name": "work", "uses": "python", "with": {"function": fn}}]}
    run_id = client.submit(
        {"name": name("p"), "steps": [{"name": "compose", "uses": "workflow", "with": {"definition": inline}}]}
    )
    assert entered.wait(15)
    poll(lambda: client.status(run_id)["steps"]["compose"]["status"] == "waiting", "the parent step to wait")
    child_id = client.status(run_id)["steps"]["compose"]["child_run_id"]

    client.cancel(run_id)
    release.set()

    assert client.status(child_id)["status"] == "cancelled"
    assert client.status(run_id)["status"] == "cancelled"


def test_a_child_ending_counts_its_spend_into_the_parent_once_and_completes_only_a_waiting_step() -> None:
    store = MemoryStateStore()
    spec = parse_workflow({"name": "p", "steps": [{"name": "compose", "uses": "workflow", "with": {"workflow": "c"}}]})
    store.save_definition(spec)
    store.create_run("parent", spec, {}, None)
    claim = store.claim(Attempt("parent", "compose", "1", "t1"), lease_s=10, upstream=(), children=())
    assert claim.outcome == "ok"
    link = ParentLink("parent", "compose", None, "1", 2)
    totals = ChildTotals(spent_nusd=500, calls=2, input_tokens=10, output_tokens=20)

    assert not store.child_ended(link, "child", totals, task_id="x", lease_s=10)  # not parked yet: not its child
    assert store.wait_for_child(Attempt("parent", "compose", "1", "t1"), "child")
    assert not store.child_ended(replace(link, generation="2"), "child", totals, task_id="x", lease_s=10)
    assert store.child_ended(link, "child", totals, task_id="x", lease_s=10)
    assert not store.child_ended(link, "child", totals, task_id="y", lease_s=10)

    fields = store.run_fields("parent")
    assert fields["s:compose:status"] == "running"
    assert fields["s:compose:task"] == "x"
    assert (fields["llm_spent_nusd"], fields["llm_calls"], fields["llm_output_tokens"]) == ("500", "2", "20")
    assert not store.wait_for_child(Attempt("parent", "compose", "1", "t1"), "child")  # stale
