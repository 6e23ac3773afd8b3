"""Agent steps: validation of files, tools and the calculator, and the tool loop against the in-memory store.

The engine helpers of ``test_engine_attempt`` stand in for the broker; the offline provider plays the model.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from orchestrator.agents.builtin import evaluate_arithmetic
from orchestrator.agents.tools import ToolContext, ToolInputError, make_tool, tool, tools
from orchestrator.cli import main
from orchestrator.engine.status import run_view
from orchestrator.llm import AnthropicClient, LLMRequest
from orchestrator.llm.base import LLMResponse, TextCallback
from orchestrator.llm.offline import OfflineClient
from orchestrator.state import MemoryStateStore
from tests.fake_anthropic import FakeReply, fake_anthropic_server, message_body
from tests.unit.test_engine_attempt import drive, make_runtime, start, workflow
from tests.unit.test_streaming import RecordingSink, _streamed_text

pytestmark = pytest.mark.timeout(30)


@tool(name="tests.unit.lookup")
def lookup(city: str, days: int = 3) -> dict[str, Any]:
    """Look up the weather of a city for some days."""
    return {"city": city, "days": days, "sky": "clear"}


class Order(BaseModel):
    item: str
    quantity: int


@tool(name="tests.unit.order")
def order(value: Order) -> dict[str, Any]:
    """Order an item."""
    return {"ordered": value.quantity, "item": value.item}


@tool(name="tests.unit.broken")
def broken() -> None:
    """Always fails."""
    raise RuntimeError("the tool broke")


def agent(name: str = "agent", **params: Any) -> dict[str, Any]:
    return {"name": name, "uses": "agent", "with": {"prompt": "Research {{ inputs.topic }}", **params}}


def run_agent_step(**params: Any) -> tuple[dict[str, Any], Any, list[Any]]:
    runtime, publisher = make_runtime(MemoryStateStore())
    definition = workflow(agent(**params))
    run_id = start(runtime, publisher, definition, topic="tides")
    drive(runtime, publisher)
    from orchestrator.definition.spec import parse_workflow

    view = run_view(runtime.store.run_fields(run_id), parse_workflow(definition))
    return dict(view["steps"]["agent"]), runtime.store, list(runtime.store.events(run_id))


# -- validation ----------------------------------------------------------------------------------------------------


def validate(tmp_path: Path, params: str) -> tuple[int, str]:
    path = tmp_path / "agent.yaml"
    path.write_text(f"name: agents\nsteps:\n  - name: researcher\n    uses: agent\n    with: {params}\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    return result.exit_code, result.output


def test_a_file_with_builtin_and_workflow_tools_is_valid(tmp_path: Path) -> None:
    code, out = validate(tmp_path, '{prompt: "p", tools: [calculator, notes.read, notes.write, "workflow:fact_check"]}')
    assert code == 0, out


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ('{prompt: "p", tools: [shell]}', "shell"),
        ('{prompt: "p", tools: ["rm -rf /"]}', "rm -rf /"),
        ('{prompt: "p", tools: ["workflow:"]}', "workflow:"),
        ('{prompt: "p", tools: [calculator, calculator]}', "calculator"),
        ('{prompt: "p", max_turns: 0}', "max_turns"),
        ('{prompt: "p", max_turns: 51}', "max_turns"),
        ('{prompt: "p", tool_timeout_s: 0}', "tool_timeout_s"),
        ('{prompt: "p", tools: [calculator], simulate: {tool_calls: [[{name: notes.read}]]}}', "notes.read"),
    ],
)
def test_a_file_with_a_bad_tool_or_bound_is_refused_naming_it(tmp_path: Path, params: str, named: str) -> None:
    code, out = validate(tmp_path, params)
    assert code != 0
    assert named in out


def test_repeat_is_refused_on_an_agent_step(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "name: a\nsteps:\n  - name: s\n    uses: agent\n    repeat: {until: 'true', max_iterations: 2}\n"
        "    with: {prompt: p}\n"
    )
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code != 0
    assert "repeat is not supported on agent steps" in result.output


# -- tools ---------------------------------------------------------------------------------------------------------


def test_a_registered_tool_gets_its_schema_from_type_hints_and_its_description_from_the_docstring() -> None:
    entry = tools.get("tests.unit.lookup")
    assert entry is not None
    definition = entry.definition()
    assert definition["name"] == "tests_unit_lookup"
    assert definition["description"] == "Look up the weather of a city for some days."
    schema = definition["input_schema"]
    assert schema["required"] == ["city"]
    assert schema["properties"]["days"]["type"] == "integer"


def test_a_tool_taking_a_pydantic_model_is_described_and_called_with_it() -> None:
    entry = tools.get("tests.unit.order")
    assert entry is not None
    assert set(entry.input_schema["properties"]) == {"item", "quantity"}
    ctx = ToolContext("r", "s", 1, "c")
    assert entry.call(entry.validate({"item": "tea", "quantity": 2}), ctx) == {"ordered": 2, "item": "tea"}


def test_an_input_that_does_not_fit_the_schema_is_an_error_naming_the_field() -> None:
    entry = tools.get("tests.unit.lookup")
    assert entry is not None
    with pytest.raises(ToolInputError, match="days"):
        entry.validate({"city": "Brest", "days": "many"})


def test_a_tool_without_a_docstring_or_type_hints_cannot_be_registered() -> None:
    from orchestrator.errors import WorkflowDefinitionError

    def undocumented(x: int) -> int:
        return x

    def untyped(x):  # type: ignore[no-untyped-def]  # the missing hint is what is tested
        """Doc."""
        return x

    with pytest.raises(WorkflowDefinitionError, match="docstring"):
        make_tool(undocumented)
    with pytest.raises(WorkflowDefinitionError, match="type hint"):
        make_tool(untyped)


@pytest.mark.parametrize(("expression", "value"), [("6*7", 42), ("2 ** 10 / 4", 256.0), ("-(3 + 4) % 5", 3)])
def test_the_calculator_does_arithmetic(expression: str, value: float) -> None:
    assert evaluate_arithmetic(expression) == value


@pytest.mark.parametrize(
    "expression",
    ["__import__('os')", "a + 1", "9 ** 9 ** 9", "1 / 0", "x" * 2000, "(1).real", "[1, 2]", "10**200*10**200"],
)
def test_the_calculator_refuses_anything_but_bounded_arithmetic(expression: str) -> None:
    with pytest.raises(ValueError, match=r"allowed|too large|zero|characters|not an arithmetic"):
        evaluate_arithmetic(expression)


# -- the loop, against the in-memory store -------------------------------------------------------------------------


def test_an_agent_calls_scripted_tools_turn_by_turn_and_shares_notes() -> None:
    script = [
        [
            {"name": "calculator", "input": {"expression": "6*7"}},
            {"name": "notes.write", "input": {"key": "k", "value": [1]}},
        ],
        [{"name": "notes.read", "input": {"key": "k"}}, {"name": "tests.unit.lookup", "input": {"city": "Brest"}}],
    ]
    tools_used = ["calculator", "notes.read", "notes.write", "tests.unit.lookup"]
    step, _store, events = run_agent_step(tools=tools_used, simulate={"tool_calls": script})

    assert step["status"] == "succeeded"
    output = step["output"]
    assert (output["turns"], output["stop_reason"]) == (3, "end_turn")
    assert [(c["name"], c.get("output")) for c in output["tool_calls"]] == [
        ("calculator", {"result": 42}),
        ("notes.write", {"ok": True}),
        ("notes.read", {"value": [1]}),
        ("tests.unit.lookup", {"city": "Brest", "days": 3, "sky": "clear"}),
    ]
    assert output["text"]
    assert output["usage"]["output_tokens"] > 0
    turns = [e.data for e in events if e.type == "agent_turn"]
    assert [(t["turn"], t["tool_calls"]) for t in turns] == [(1, 2), (2, 2), (3, 0)]
    assert [e.data["name"] for e in events if e.type == "tool_call"] == [c["name"] for c in output["tool_calls"]]


def test_without_a_script_the_model_calls_each_tool_once_then_answers() -> None:
    step, _, _ = run_agent_step(tools=["calculator", "tests.unit.lookup"])

    output = step["output"]
    assert output["turns"] == 2
    assert [c["name"] for c in output["tool_calls"]] == ["calculator", "tests.unit.lookup"]
    assert output["tool_calls"][0]["output"] == {"result": 42}, "the schema's example input"


def test_a_validation_error_or_an_exception_in_a_tool_goes_back_to_the_model() -> None:
    script = [[{"name": "calculator", "input": {"expr": "1"}}, {"name": "tests.unit.broken", "input": {}}]]
    step, _, events = run_agent_step(tools=["calculator", "tests.unit.broken"], simulate={"tool_calls": script})

    assert step["status"] == "succeeded"
    calls = step["output"]["tool_calls"]
    assert "expression" in calls[0]["error"]
    assert "output" not in calls[0]
    assert calls[1]["error"] == "RuntimeError: the tool broke"
    assert [e.data["error"] for e in events if e.type == "tool_call"] == [True, True]


def test_an_agent_out_of_turns_fails_once_as_max_turns_keeping_its_transcript() -> None:
    script = [[{"name": "calculator", "input": {"expression": f"{n}+1"}}] for n in range(3)]
    step, _, _ = run_agent_step(tools=["calculator"], max_turns=2, simulate={"tool_calls": script})

    assert (step["status"], step["attempts"]) == ("failed", 1)
    error = step["error"]
    assert error["type"] == "max_turns"
    assert "max_turns=2" in error["message"]
    assert error["transcript"]["turns"] == 2
    assert [c["output"] for c in error["transcript"]["tool_calls"]] == [{"result": 1}, {"result": 2}]


def test_a_workflow_tool_naming_an_unknown_workflow_answers_the_model_with_an_error() -> None:
    script = [[{"name": "workflow:fact_check", "input": {"inputs": {"claim": "x"}}}]]
    step, _, _ = run_agent_step(tools=["workflow:fact_check"], simulate={"tool_calls": script})

    assert step["status"] == "succeeded"
    error = step["output"]["tool_calls"][0]["error"]
    assert "no registered workflow 'fact_check'" in error, error


def test_a_tool_not_registered_on_the_worker_fails_the_step_as_unknown_tool() -> None:
    step, _, _ = run_agent_step(tools=["tests.unit.nowhere"])

    assert (step["status"], step["error"]["type"]) == ("failed", "unknown_tool")


# -- the real SDK path ---------------------------------------------------------------------------------------------


def test_the_sdk_sends_tools_and_tool_results_and_reads_tool_use_blocks() -> None:
    tool_use = {
        **message_body(),
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "calculator", "input": {"expression": "1+1"}}],
        "stop_reason": "tool_use",
    }
    with fake_anthropic_server() as server:
        server.queue(FakeReply(body=tool_use))
        client = AnthropicClient(api_key="test", base_url=server.base_url)
        definition = {"name": "calculator", "description": "d", "input_schema": {"type": "object"}}
        messages: tuple[dict[str, Any], ...] = ({"role": "user", "content": "add"},)
        first = client.complete(LLMRequest(model="m", prompt="add", messages=messages, tools=(definition,)))
        follow = (
            *messages,
            {"role": "assistant", "content": list(first.content)},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": '{"result":2}'}]},
        )
        second = client.complete(LLMRequest(model="m", prompt="add", messages=follow, tools=(definition,)))

    assert first.stop_reason == "tool_use"
    assert first.content[0]["input"] == {"expression": "1+1"}
    assert second.content == ()
    assert second.text == "Hello"
    sent = server.requests[1].body
    assert sent["tools"] == [definition]
    assert sent["messages"][2]["content"][0]["tool_use_id"] == "toolu_1"


def test_the_research_team_example_runs_offline_sharing_notes_between_agents() -> None:
    import yaml

    from orchestrator.definition.spec import parse_workflow

    definition = yaml.safe_load((Path(__file__).parents[2] / "examples" / "research_team.yaml").read_text())
    runtime, publisher = make_runtime(MemoryStateStore())
    run_id = start(runtime, publisher, definition, topic="tides")
    drive(runtime, publisher)

    view = run_view(runtime.store.run_fields(run_id), parse_workflow(definition))
    assert view["status"] == "succeeded"
    calls = {call["name"]: call for call in view["steps"]["supervisor"]["output"]["tool_calls"]}
    assert calls["notes.read"]["output"]["value"][0] == "two tides a day", "the scout's note, read by the supervisor"
    assert calls["calculator"]["output"] == {"result": 12.0}
    # No fact_check here (this driver runs one step at a time): an error the model is told, and the loop goes on.
    assert "fact_check" in calls["workflow:fact_check"]["error"]


# -- streaming -----------------------------------------------------------------------------------------------------


class ChattyClient:
    """The offline model, saying a line of text before each turn's tool calls (as a real model often does)."""

    def __init__(self) -> None:
        self.offline = OfflineClient()

    def complete(self, request: LLMRequest, on_text: TextCallback | None = None) -> LLMResponse:
        response = self.offline.complete(request, on_text=on_text)
        if response.stop_reason != "tool_use":
            return response
        said = f"Calling tools, turn {sum(1 for m in request.messages if m['role'] == 'assistant') + 1}. "
        if on_text is not None:
            on_text(said)
        content = ({"type": "text", "text": said}, *response.content)
        return replace(response, text=said, content=content)


SCRIPT = [
    [{"name": "calculator", "input": {"expression": "6*7"}}],
    [{"name": "calculator", "input": {"expression": "1+1"}}],
]


def streamed_agent(chatty: bool) -> tuple[dict[str, Any], list[Any]]:
    sink = RecordingSink()
    runtime, publisher = make_runtime(MemoryStateStore(), deltas=sink)
    if chatty:
        runtime.executor.llm.client = ChattyClient()
    definition = workflow(agent(tools=["calculator"], simulate={"tool_calls": SCRIPT}, stream=True))
    run_id = start(runtime, publisher, definition, topic="tides")
    drive(runtime, publisher)
    from orchestrator.definition.spec import parse_workflow

    view = run_view(runtime.store.run_fields(run_id), parse_workflow(definition))
    step = dict(view["steps"]["agent"])
    assert step["status"] == "succeeded"
    assert [f[1:] for f in sink.finished] == [("agent", None, 1)]
    return step["output"], sink.deltas


def test_a_streaming_agent_streams_its_final_turns_text_as_deltas_that_concatenate_to_the_output() -> None:
    output, deltas = streamed_agent(chatty=False)

    assert output["turns"] == 3
    assert [d for d in deltas if d.type == "llm_delta"]
    assert _streamed_text(deltas) == output["text"]
    # Tool-only turns streamed no text, so nothing needs starting over.
    assert "".join(d.text for d in deltas) == output["text"]


def test_each_later_turn_of_a_streaming_agent_that_says_something_starts_with_a_reset() -> None:
    output, deltas = streamed_agent(chatty=True)

    assert output["turns"] == 3
    kinds = [(d.type, d.text.split(".")[0]) for d in deltas]
    assert kinds[:4] == [
        ("llm_delta", "Calling tools, turn 1"),
        ("llm_reset", ""),
        ("llm_delta", "Calling tools, turn 2"),
        ("llm_reset", ""),
    ]
    assert "llm_reset" not in [d.type for d in deltas[4:]]
    assert _streamed_text(deltas) == output["text"]
