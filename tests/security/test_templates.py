"""Hostile prompt templates and approval messages: a total allocation and time budget per render, nesting refused
with one line, approval messages validated and bounded like prompts (issue 12, items 3, 4, 9 and 10)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from orchestrator.definition.registry import FunctionRegistry
from orchestrator.definition.spec import ApprovalParams, parse_workflow
from orchestrator.definition.templates import TEMPLATE_BUDGET_BYTES, check_template, render
from orchestrator.definition.validation import check_workflow
from orchestrator.engine.steps import MAX_APPROVAL_MESSAGE_CHARS, StepContext, StepExecutor
from orchestrator.errors import NonRetryableStepError, WorkflowDefinitionError
from orchestrator.infra.settings import Settings
from orchestrator.llm.gateway import CallContext

pytestmark = pytest.mark.timeout(60)

CONTEXT: dict[str, Any] = {"inputs": {"topic": "tests"}, "steps": {}, "run_id": "r1", "attempt": 1}
# Each of these stays under every per-value limit, yet makes far more than the total budget (or would, unchecked).
ALLOCATION_BOMBS = [
    # 8 x 16 MB kept in a namespace list: 128 MB, each value within the 16 M-character limit.
    "{% set ns = namespace(l=[]) %}{% for i in range(8) %}{% set ns.l = ns.l + ['x' * 16000000] %}{% endfor %}"
    "{{ ns.l|length }}",
    # Millions of string objects from one 16 MB string.
    "{{ ('x ' * 8000000).split()|length }}",
    "{{ ('x,' * 8000000).split(',')|length }}",
    "{{ ('x\n' * 8000000).splitlines()|length }}",
    # One list item per character, and a sort of them.
    "{{ ('x' * 4000000)|sort|length }}",
    "{{ ('x' * 4000000)|list|length }}",
    # Words the filter splits into on the way.
    "{{ ('x ' * 8000000)|wordcount }}",
    # Output thrown away into a block, many times over.
    "{% for i in range(10) %}{% set x %}{{ 'y' * 15000000 }}{% endset %}{% endfor %}done",
]
# A few milliseconds of work per iteration that allocates almost nothing: only the clock can stop it.
SLOW = "{% set s = inputs.topic * 100000 %}{% for i in range(200) %}{{ s|max }}{% endfor %}"


def llm_spec(prompt: str, **step: Any) -> Any:
    writer = {"name": "writer", "uses": "llm", "with": {"prompt": prompt}, **step}
    return parse_workflow({"name": "t", "inputs": {"topic": {"type": "string", "default": "x"}}, "steps": [writer]})


@pytest.mark.parametrize("source", ALLOCATION_BOMBS)
def test_a_template_allocating_past_its_total_budget_fails_as_template_limit(source: str) -> None:
    with pytest.raises(NonRetryableStepError) as refused:
        render(source, dict(CONTEXT))

    assert refused.value.kind == "template_limit"
    assert str(TEMPLATE_BUDGET_BYTES) in str(refused.value)


def test_ordinary_use_of_big_inputs_stays_within_the_budget() -> None:
    text = "word " * 200_000  # 1 MB of input, split, sorted and joined
    source = "{{ inputs.text.split()|length }} {{ inputs.text.split()|unique|list|length }} {{ inputs.text|wordcount }}"

    assert render(source, {**CONTEXT, "inputs": {"text": text}}) == "200000 1 200000"


def test_a_template_running_past_its_time_limit_fails_as_template_limit_soon_after() -> None:
    started = time.monotonic()

    with pytest.raises(NonRetryableStepError) as refused:
        render(SLOW, dict(CONTEXT), timeout_s=0.5)

    assert refused.value.kind == "template_limit"
    assert "time limit of 0.5s" in str(refused.value)
    assert time.monotonic() - started < 3


def test_a_deadline_sooner_than_the_time_limit_wins() -> None:
    started = time.monotonic()

    with pytest.raises(NonRetryableStepError) as refused:
        render(SLOW, dict(CONTEXT), timeout_s=60, deadline=started + 0.3)

    assert refused.value.kind == "template_limit"
    assert time.monotonic() - started < 3


def test_the_template_time_limit_is_a_setting_with_a_default() -> None:
    assert Settings.from_env({"ORCH_TEMPLATE_TIMEOUT_S": "1.5"}).template_timeout_s == 1.5
    assert Settings.from_env({}).template_timeout_s == 5.0


# -- statically decidable: refused at submit ---------------------------------------------------------------------------


def test_a_template_reading_no_variable_that_passes_the_budget_is_refused_at_validation() -> None:
    with pytest.raises(WorkflowDefinitionError) as refused:
        check_workflow(llm_spec(ALLOCATION_BOMBS[0]), FunctionRegistry())

    assert refused.value.step == "writer"
    assert "budget" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_template_reading_its_inputs_is_left_to_the_run() -> None:
    check_workflow(llm_spec("{{ (inputs.topic * 16000000)|list|length }}"), FunctionRegistry())


# -- the llm step's timeout covers the whole attempt -------------------------------------------------------------------


class RecordingGateway:
    """Stands in for the LLM gateway: records each request and fails it (the test needs only what was asked)."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def complete(self, request: Any, call: Any) -> Any:
        self.requests.append(request)
        raise NonRetryableStepError("recorded", kind="recorded")


def executor(gateway: RecordingGateway, **options: Any) -> StepExecutor:
    return StepExecutor(
        gateway,
        FunctionRegistry(),
        max_output_bytes=10_000,
        llm_timeout_s=120,  # type: ignore[arg-type]
        **options,
    )


def test_an_llm_step_rendering_past_its_timeout_fails_as_template_limit_without_calling_the_llm() -> None:
    gateway = RecordingGateway()
    step = llm_spec(SLOW, timeout_s=1).steps[0]
    started = time.monotonic()

    with pytest.raises(NonRetryableStepError) as refused:
        executor(gateway).run(step, StepContext("r1", "writer", 1, {"topic": "tests"}, {}), CallContext("r1", "t"))

    assert refused.value.kind == "template_limit"
    assert time.monotonic() - started < 4
    assert gateway.requests == []


def test_an_llm_call_gets_only_what_rendering_left_of_the_steps_timeout() -> None:
    gateway = RecordingGateway()
    # Rendering takes a measurable part of a second, well under the template time limit.
    source = "{% set s = inputs.topic * 20000 %}{% for i in range(40) %}{{ s|max }}{% endfor %}"
    step = llm_spec(source, timeout_s=30).steps[0]
    started = time.monotonic()

    with pytest.raises(NonRetryableStepError, match="recorded"):
        executor(gateway).run(step, StepContext("r1", "writer", 1, {"topic": "tests"}, {}), CallContext("r1", "t"))

    rendering = gateway.requests[0].timeout_s
    assert rendering <= 30 - (time.monotonic() - started) + 0.05  # what was left when the call was made
    assert rendering < 30


# -- approval messages -------------------------------------------------------------------------------------------------


def approval_spec(message: str) -> Any:
    return parse_workflow(
        {
            "name": "t",
            "inputs": {"topic": {"type": "string", "default": "x"}},
            "steps": [
                {"name": "draft", "uses": "noop"},
                {"name": "other", "uses": "noop"},
                {
                    "name": "review",
                    "uses": "approval",
                    "depends_on": ["draft"],
                    "with": {"approvers": ["ops"], "message": message},
                },
            ],
        }
    )


@pytest.mark.parametrize(
    ("message", "named"),
    [
        ("{% if inputs.topic %}unfinished", "does not parse"),
        ("{{ inputs.__class__ }}", "internal attribute"),
        ("{{ secrets }}", "not defined"),
        ("{{ steps.other.output }}", "steps.other"),
        ("{{ steps.nowhere.output }}", "steps.nowhere"),
        ("{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}", "nests too deeply"),
        (ALLOCATION_BOMBS[0], "budget"),
    ],
)
def test_an_approval_message_is_validated_like_a_prompt(message: str, named: str) -> None:
    with pytest.raises(WorkflowDefinitionError) as refused:
        check_workflow(approval_spec(message), FunctionRegistry())

    assert refused.value.step == "review"
    assert named in str(refused.value)


def test_an_approval_message_reading_its_upstream_step_is_valid() -> None:
    check_workflow(approval_spec("Publish {{ inputs.topic }}? {{ steps.draft.output }}"), FunctionRegistry())


def test_an_approval_message_renders_with_a_small_limit() -> None:
    params = ApprovalParams(approvers=("ops",), message="{{ inputs.topic * 100000 }}")
    ctx = StepContext("r1", "review", 1, {"topic": "long "}, {})

    with pytest.raises(NonRetryableStepError) as refused:
        executor(RecordingGateway()).approval_message(params, ctx)

    assert refused.value.kind == "message_too_large"
    assert str(MAX_APPROVAL_MESSAGE_CHARS) in str(refused.value)


def test_an_approval_message_within_the_limit_renders() -> None:
    params = ApprovalParams(approvers=("ops",), message="Publish {{ inputs.topic }}?")

    message = executor(RecordingGateway()).approval_message(params, StepContext("r1", "review", 1, {"topic": "x"}, {}))

    assert message == "Publish x?"


# -- nesting -----------------------------------------------------------------------------------------------------------

DEEP = [
    "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}",
    "{{ " + "-" * 1990 + "1 }}",
    "{{ " + "-" * 400 + "1 }}",  # parses, but too deep for the code generator
    "{{ " + "[" * 300 + "]" * 300 + " }}",
]


@pytest.mark.parametrize("source", DEEP)
def test_a_template_nested_too_deeply_is_one_error_line_at_validation(source: str) -> None:
    with pytest.raises(WorkflowDefinitionError) as refused:
        check_template(source, step="writer")

    assert str(refused.value) == "step 'writer': template nests too deeply"


@pytest.mark.parametrize("source", DEEP)
def test_a_template_nested_too_deeply_is_a_template_error_at_run_time(source: str) -> None:
    with pytest.raises(NonRetryableStepError) as refused:
        render(source, dict(CONTEXT))

    assert refused.value.kind == "template_error"
    assert str(refused.value) == "template failed: it nests too deeply"
