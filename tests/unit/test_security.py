"""Hostile templates, conditions and python steps, without Redis: sandbox escapes and resource bombs are refused with a
clear error when the workflow is validated and again when a step renders, nothing is ever executed, a prompt over
``ORCH_MAX_PROMPT_BYTES`` fails before any LLM call, and a ``python`` step can only call registered functions.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import pytest

from orchestrator.definition.conditions import check_condition, evaluate_condition
from orchestrator.definition.registry import FunctionRegistry
from orchestrator.definition.spec import parse_workflow
from orchestrator.definition.templates import MAX_VALUE_CHARS, check_template, render
from orchestrator.definition.validation import check_workflow
from orchestrator.engine.steps import StepContext, StepExecutor
from orchestrator.errors import NonRetryableStepError, WorkflowDefinitionError
from orchestrator.infra.settings import Settings
from orchestrator.llm.gateway import CallContext

pytestmark = pytest.mark.timeout(30)  # a resource bomb that got through would hang or exhaust memory here

CONTEXT = {
    "inputs": {"topic": "Redis", "tags": ["a", "b"]},
    "steps": {"research": {"output": {"text": "facts", "word_count": 1}}},
    "run_id": "r1",
    "attempt": 1,
}

# Each escape would reach Python internals, the process environment or a shell if the sandbox let it.
ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ self._TemplateReference__context }}",
    "{{ lipsum.__globals__ }}",
    "{{ joiner.__init__.__globals__['os'].system('touch MARKER') }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ config }}",
    "{{ request }}",
    "{{ inputs|attr('__class__') }}",
    "{{ inputs['__class__'] }}",
    "{{ '%s'|format(cycler.__init__.__globals__) }}",
    "{{ inputs.__class__ }}",
    "{{ inputs.topic.__class__.__base__.__subclasses__() }}",
]
# Refused only when rendered: the attribute is named inside a string the sandbox's formatter reads.
RENDER_TIME_ESCAPES = [
    "{{ '{0.__class__.__mro__}'.format(inputs) }}",
    "{{ '{0.__init__.__globals__}'.format(cycler) }}",
]
# Each would hang a worker or exhaust its memory if it were computed.
BOMBS = [
    "{{ range(10**9)|list }}",
    "{{ 'a' * 10**10 }}",
    "{{ [0] * 10**10 }}",
    "{{ 10 ** (10 ** 10) }}",
    "{{ 5|round(-1000000000) }}",
    "{{ 5|round(-1000000000, 'ceil') }}",
    "{{ 'x'|center(10**10) }}",
    "{{ inputs.topic.ljust(10**10) }}",
    "{{ (1).to_bytes(10**10, 'big') }}",
    "{{ '%0999999999d'|format(1) }}",
    "{{ '%*d'|format(999999999, 1) }}",
    "{{ '%0999999999d' % 1 }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ lipsum(10**6) }}",
    "{{ 'ab'.replace('', 'x' * 100000) * 1000 }}",
    "{{ (range(100000)|list)|join('x' * 1000) }}",
    "{{ [1, 2]|batch(10**9, 'x')|list }}",
    "{{ {'a': 1}|tojson(indent=10**9) }}",
    "{{ [[1]] * 100000|sum(start=[]) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "{% set x %}{% for i in range(100000) %}{{ 'y' * 10000 }}{% endfor %}{% endset %}{{ x|length }}",
    "{% for x in range(100000) recursive %}{% if loop.depth < 4 %}{{ loop(range(100000)) }}{% endif %}{% endfor %}",
]


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty directory, so a ``touch MARKER`` that got through would leave a file to find."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("source", ESCAPES + RENDER_TIME_ESCAPES)
def test_a_sandbox_escape_in_a_prompt_fails_the_step_and_executes_nothing(source: str, cwd: Path) -> None:
    context: dict[str, Any] = {**CONTEXT, "inputs": {"topic": "Redis", "tags": ["a", "b"]}}

    with pytest.raises(NonRetryableStepError) as refused:
        render(source, context)

    assert refused.value.kind == "template_error"
    assert "unsafe" in str(refused.value) or "is undefined" in str(refused.value)
    assert list(cwd.iterdir()) == [], "nothing ran"
    assert context["inputs"] == {"topic": "Redis", "tags": ["a", "b"]}


@pytest.mark.parametrize("source", ESCAPES)
def test_a_sandbox_escape_in_a_prompt_is_refused_when_the_workflow_is_validated(source: str) -> None:
    spec = parse_workflow({"name": "escape", "steps": [{"name": "writer", "uses": "llm", "with": {"prompt": source}}]})

    with pytest.raises(WorkflowDefinitionError) as refused:
        check_workflow(spec, FunctionRegistry())

    assert refused.value.step == "writer"
    assert "internal attribute" in str(refused.value) or "not defined" in str(refused.value)


@pytest.mark.parametrize("source", BOMBS)
def test_a_resource_bomb_in_a_prompt_is_refused_before_it_is_computed(source: str) -> None:
    check_template(source, step="writer")  # well-formed: only rendering can tell

    with pytest.raises(NonRetryableStepError) as refused:
        render(source, dict(CONTEXT))

    # A value past its own limit is a template_error; a render past its total budget, a template_limit.
    assert refused.value.kind in {"template_error", "template_limit"}
    message = str(refused.value)
    assert any(word in message for word in ("limit", "MAX_RANGE", "budget", "loop iterations", "only add numbers"))


@pytest.mark.parametrize(
    "source",
    [
        "Facts: {{ steps.research.output.text }} about {{ inputs.topic|upper }}",
        "{% for t in inputs.tags %}{{ loop.index }}. {{ t }}\n{% endfor %}",
        "{{ '%s has %d tags'|format(inputs.topic, inputs.tags|length) }} {{ '{:>6}'.format(inputs.topic) }}",
        "{{ inputs.tags|join(', ') }} {{ 'ab' * 3 }} {{ 2 ** 64 }} {{ 3.14159|round(2) }} {{ inputs.topic ~ '!' }}",
        "{{ (range(1000)|list)|length }} {{ inputs.topic|center(20) }} {{ lipsum(2, html=False)|length > 0 }}",
    ],
)
def test_ordinary_templates_still_render_under_the_limits(source: str) -> None:
    assert render(source, dict(CONTEXT))


def test_a_template_may_make_a_value_exactly_at_the_size_limit_but_not_one_past_it() -> None:
    at_limit = render("{{ ('a' * %d)|length }}" % MAX_VALUE_CHARS, dict(CONTEXT))  # noqa: UP031

    with pytest.raises(NonRetryableStepError):
        render("{{ ('a' * %d)|length }}" % (MAX_VALUE_CHARS + 1), dict(CONTEXT))  # noqa: UP031
    assert at_limit == str(MAX_VALUE_CHARS)


# -- conditions --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "''.__class__.__mro__",
        "inputs.__class__",
        "inputs['__class__']",
        "inputs|attr('__class__')",
        "steps.research.output.__init__",
        "lipsum.__globals__",
        "cycler.__init__.__globals__.os.popen('touch MARKER').read()",
        "config",
    ],
)
def test_a_condition_reaching_for_internals_is_refused_at_validation_and_when_evaluated(source: str, cwd: Path) -> None:
    with pytest.raises(WorkflowDefinitionError) as at_validation:
        check_condition(source, step="gate", upstream={"research"})
    with pytest.raises(NonRetryableStepError) as at_run:
        evaluate_condition(source, inputs={"topic": "x"}, outputs={"research": {"text": "t"}})

    assert at_validation.value.step == "gate"
    assert at_run.value.kind == "condition_error"
    assert list(cwd.iterdir()) == [], "nothing ran"


@pytest.mark.parametrize(
    "source",
    [
        "'a' * 10**10 > ''",
        "10 ** (10 ** 10) > 1",
        "inputs.topic|center(10**10)|length > 1",
        "(inputs.topic ~ inputs.topic)|round(-1000000000) > 0",
        "inputs.topic * 10**10 == ''",
    ],
)
def test_a_condition_that_would_exhaust_the_worker_is_refused_when_evaluated(source: str) -> None:
    check_condition(source, step="gate", upstream=set())  # calls nothing, reads only inputs: valid

    with pytest.raises(NonRetryableStepError) as refused:
        evaluate_condition(source, inputs={"topic": "x"}, outputs={})

    assert refused.value.kind == "condition_error"


# -- prompt size -------------------------------------------------------------------------------------------------------


class RecordingGateway:
    """Stands in for the LLM gateway and only records that it was called."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def complete(self, request: Any, call: Any) -> Any:
        self.calls.append(request)
        raise AssertionError("the LLM must not be called")


def llm_step(prompt: str, system: str | None = None) -> Any:
    params: dict[str, Any] = {"prompt": prompt, **({"system": system} if system else {})}
    return parse_workflow({"name": "big", "steps": [{"name": "writer", "uses": "llm", "with": params}]}).steps[0]


def executor(gateway: RecordingGateway, registry: FunctionRegistry | None = None, prompt_limit: int = 1000) -> Any:
    return StepExecutor(
        gateway,
        registry or FunctionRegistry(),
        max_output_bytes=10_000,
        llm_timeout_s=5,  # type: ignore[arg-type]
        max_prompt_bytes=prompt_limit,
    )


def context(**inputs: Any) -> StepContext:
    return StepContext("run1", "writer", 1, inputs, {})


@pytest.mark.parametrize(
    ("prompt", "system", "inputs"),
    [
        ("Summarise: {{ inputs.text }}", None, {"text": "x" * 1001}),  # a big input, a small template
        ("{% for i in range(50) %}{{ inputs.text }}{% endfor %}", None, {"text": "y" * 100}),  # amplified
        ("{{ inputs.text }}", "{{ inputs.text }}", {"text": "z" * 600}),  # prompt and system together
        ("{{ inputs.text }}", None, {"text": "é" * 600}),  # 600 characters, 1,200 bytes
    ],
)
def test_a_rendered_prompt_over_the_limit_fails_the_step_before_any_llm_call(
    prompt: str, system: str | None, inputs: dict[str, Any]
) -> None:
    gateway = RecordingGateway()

    with pytest.raises(NonRetryableStepError) as refused:
        executor(gateway).run(llm_step(prompt, system), context(**inputs), CallContext(run_id="run1", workflow="big"))

    assert refused.value.kind == "prompt_too_large"
    assert "ORCH_MAX_PROMPT_BYTES" in str(refused.value)
    assert gateway.calls == []


def test_the_prompt_limit_is_read_from_the_environment_with_a_default() -> None:
    assert Settings.from_env({"ORCH_MAX_PROMPT_BYTES": "12345"}).max_prompt_bytes == 12345
    assert Settings.from_env({}).max_prompt_bytes == 4 * 1024 * 1024


# -- python steps ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["os.system", "subprocess.run", "builtins.eval", "importlib.import_module"])
def test_a_python_step_naming_an_import_path_is_refused_at_validation(name: str) -> None:
    spec = parse_workflow({"name": "sneaky", "steps": [{"name": "run", "uses": "python", "with": {"function": name}}]})

    with pytest.raises(WorkflowDefinitionError) as refused:
        check_workflow(spec, FunctionRegistry())

    assert refused.value.step == "run"
    assert f"no registered function {name!r}" in str(refused.value)


@pytest.mark.parametrize("name", ["os.system", "subprocess.run", "tests.workflows.sleep", "importlib.import_module"])
def test_a_python_step_that_got_past_validation_fails_unknown_function_without_importing_anything(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    imported: list[str] = []
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda module, *a: imported.append(module) or real_import(module))
    called: list[Any] = []
    monkeypatch.setattr(os, "system", lambda *a, **k: called.append(a))
    python = {"name": "run", "uses": "python", "with": {"function": name, "args": {"command": "id"}}}
    step = parse_workflow({"name": "sneaky", "steps": [python]})

    with pytest.raises(NonRetryableStepError) as refused:
        executor(RecordingGateway()).run(step.steps[0], context(), CallContext(run_id="run1", workflow="sneaky"))

    assert refused.value.kind == "unknown_function"
    assert f"no registered function {name!r}" in str(refused.value)
    assert imported == []
    assert called == []
