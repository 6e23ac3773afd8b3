"""Workflow validation: every bad definition is refused with the right exception and a message naming the culprit."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from orchestrator.definition.registry import FunctionRegistry
from orchestrator.definition.spec import MAX_STEPS, WorkflowSpec, parse_workflow
from orchestrator.definition.validation import check_workflow
from orchestrator.errors import CycleError, UnknownDependencyError, WorkflowDefinitionError

pytestmark = pytest.mark.timeout(30)


def noop(name: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "uses": "noop", "depends_on": list(deps), **extra}


def llm(name: str, prompt: str, *deps: str, **params: Any) -> dict[str, Any]:
    return {"name": name, "uses": "llm", "depends_on": list(deps), "with": {"prompt": prompt, **params}}


def wf(*steps: Any, **extra: Any) -> dict[str, Any]:
    return {"name": "wf", "steps": list(steps), **extra}


def refused(data: Any, kind: type[WorkflowDefinitionError] = WorkflowDefinitionError) -> WorkflowDefinitionError:
    """Parse ``data``, which must fail with exactly ``kind``; return the error."""
    with pytest.raises(WorkflowDefinitionError) as info:
        parse_workflow(data)
    assert type(info.value) is kind, f"expected {kind.__name__}, got {type(info.value).__name__}: {info.value}"
    return info.value


# -- the graph -----------------------------------------------------------------------------------------------------


def test_a_cycle_is_refused_and_its_path_is_shown_in_execution_order() -> None:
    # b needs a, c needs b, a needs c.
    error = refused(wf(noop("a", "c"), noop("b", "a"), noop("c", "b")), CycleError)

    assert isinstance(error, CycleError)
    assert error.cycle == ["a", "b", "c", "a"]
    assert "a -> b -> c -> a" in str(error)
    assert error.step == "a"


def test_a_cycle_among_other_steps_names_only_the_steps_on_the_loop() -> None:
    error = refused(
        wf(noop("start"), noop("x", "start", "z"), noop("y", "x"), noop("z", "y"), noop("tail", "z")), CycleError
    )

    assert isinstance(error, CycleError)
    assert error.cycle[0] == error.cycle[-1]
    assert sorted(error.cycle[:-1]) == ["x", "y", "z"]
    assert "start" not in str(error)
    assert "tail" not in str(error)


def test_a_step_depending_on_itself_is_a_cycle_of_one() -> None:
    error = refused(wf(noop("a"), noop("loner", "a", "loner")), CycleError)

    assert isinstance(error, CycleError)
    assert error.cycle == ["loner", "loner"]
    assert "loner -> loner" in str(error)
    assert error.step == "loner"


def test_an_unknown_dependency_names_the_step_and_the_missing_dependency() -> None:
    error = refused(wf(noop("a"), noop("b", "a", "ghost")), UnknownDependencyError)

    assert isinstance(error, UnknownDependencyError)
    assert error.step == "b"
    assert error.dependency == "ghost"
    assert "'b'" in str(error)
    assert "'ghost'" in str(error)


def test_duplicate_step_names_are_refused_naming_the_duplicate() -> None:
    error = refused(wf(noop("a"), noop("twice"), noop("twice", "a")))

    assert "duplicate" in str(error)
    assert "'twice'" in str(error)
    assert error.step == "twice"


def test_a_dependency_listed_twice_is_refused_naming_the_step() -> None:
    error = refused(wf(noop("a"), noop("b", "a", "a")))

    assert error.step == "b"
    assert "step 'b'" in str(error)
    assert "depends_on" in str(error)
    assert "'a' twice" in str(error)


@pytest.mark.parametrize("name", ["a-b", "1x", "x" * 65, "has space", ""])
def test_an_invalid_step_name_is_refused_naming_it(name: str) -> None:
    error = refused(wf(noop("ok"), noop(name)))

    assert f"step {name!r}" in str(error)
    assert "name" in str(error)
    assert error.step == name


def test_a_step_name_of_64_characters_is_accepted() -> None:
    assert parse_workflow(wf(noop("x" * 64))).steps[0].name == "x" * 64


def test_an_unknown_step_type_is_refused_naming_the_step_and_the_known_types() -> None:
    error = refused(wf(noop("a"), {"name": "run_shell", "uses": "shell", "with": {"cmd": "rm -rf /"}}))

    message = str(error)
    assert "step 'run_shell'" in message
    assert "uses" in message
    assert "llm" in message
    assert "python" in message
    assert "noop" in message
    assert error.step == "run_shell"


# -- unknown keys --------------------------------------------------------------------------------------------------


def test_an_unknown_key_at_workflow_level_is_named() -> None:
    error = refused(wf(noop("a"), colour="blue"))

    assert "colour: unknown key" in str(error)


def test_an_unknown_key_at_step_level_is_named_with_its_step() -> None:
    error = refused(wf(noop("a"), noop("b", "a", retries=3)))

    assert "step 'b': retries: unknown key" in str(error)
    assert error.step == "b"


def test_an_unknown_key_inside_with_is_named_with_its_step() -> None:
    error = refused(wf(llm("writer", "Write", temprature=0.3)))

    assert "step 'writer'" in str(error)
    assert "with.temprature: unknown key" in str(error)
    assert error.step == "writer"


def test_a_noop_step_takes_no_parameters() -> None:
    error = refused(wf({"name": "join", "uses": "noop", "with": {"prompt": "x"}}))

    assert "step 'join'" in str(error)
    assert "with.prompt: unknown key" in str(error)


def test_an_unknown_key_inside_retry_is_named_with_its_step() -> None:
    error = refused(wf(noop("a", retry={"max_attempts": 2, "backof_s": 1})))

    assert "step 'a'" in str(error)
    assert "retry.backof_s: unknown key" in str(error)


# -- kinds not available, empty and malformed documents -------------------------------------------------------------


def test_an_approval_step_needs_its_approvers_and_a_known_timeout_choice() -> None:
    missing = refused(wf(noop("a"), {"name": "sign_off", "uses": "approval", "depends_on": ["a"]}))
    wrong = refused(wf({"name": "sign_off", "uses": "approval", "with": {"approvers": ["x"], "on_timeout": "maybe"}}))
    spec = parse_workflow(wf({"name": "sign_off", "uses": "approval", "with": {"approvers": ["alice"]}}))

    assert missing.step == "sign_off"
    assert "with.approvers: Field required" in str(missing)
    assert "with.on_timeout" in str(wrong)
    assert spec.steps[0].params.approvers == ("alice",)  # type: ignore[union-attr]


@pytest.mark.parametrize("data", [{"name": "wf", "steps": []}, {"name": "wf"}], ids=["empty-list", "missing"])
def test_a_workflow_without_steps_is_refused(data: dict[str, Any]) -> None:
    error = refused(data)

    assert "no steps" in str(error)


@pytest.mark.parametrize("document", [["a", "b"], "just a string", 42, None])
def test_a_document_that_is_not_a_mapping_is_refused_naming_what_it_is(document: Any) -> None:
    error = refused(document)

    assert "must be a mapping" in str(error)
    assert type(document).__name__ in str(error)


def test_a_step_that_is_not_a_mapping_is_refused_naming_its_position() -> None:
    error = refused(wf(noop("a"), "b"))

    assert "step #2" in str(error)


def test_a_missing_workflow_name_is_named() -> None:
    error = refused({"steps": [noop("a")]})

    assert "name" in str(error)
    assert "Field required" in str(error)


# -- schemas -------------------------------------------------------------------------------------------------------


def test_an_invalid_json_schema_for_an_input_names_the_input() -> None:
    error = refused(wf(noop("a"), inputs={"topic": {"type": "string"}, "count": {"type": "integr"}}))

    assert "inputs" in str(error)
    assert "'count'" in str(error)
    assert "invalid schema" in str(error)
    assert "'topic'" not in str(error)


def test_an_invalid_output_schema_names_the_step_and_the_field() -> None:
    error = refused(wf(llm("seo", "SEO for x", output_schema={"type": "object", "required": "title"})))

    assert "step 'seo'" in str(error)
    assert "output_schema" in str(error)
    assert "not a valid JSON Schema" in str(error)
    assert error.step == "seo"


def test_an_unknown_simulated_error_is_refused_listing_the_known_ones() -> None:
    error = refused(wf(llm("flaky", "x", simulate={"errors": ["rate_limit", "gremlins"]})))

    assert "step 'flaky'" in str(error)
    assert "simulate.errors" in str(error)
    assert "'gremlins'" in str(error)
    assert "rate_limit" in str(error)
    assert "overloaded" in str(error)


# -- absurd numbers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [0, -1, -0.5])
def test_a_step_timeout_that_is_not_positive_is_refused(timeout: float) -> None:
    error = refused(wf(noop("a"), noop("slow", "a", timeout_s=timeout)))

    assert "step 'slow': timeout_s" in str(error)
    assert "greater than 0" in str(error)


@pytest.mark.parametrize("timeout", [0, -5])
def test_a_workflow_timeout_that_is_not_positive_is_refused(timeout: float) -> None:
    error = refused(wf(noop("a"), timeout_s=timeout))

    assert "timeout_s" in str(error)
    assert "greater than 0" in str(error)


def test_max_attempts_of_zero_is_refused_naming_the_step() -> None:
    error = refused(wf(noop("a", retry={"max_attempts": 0})))

    assert "step 'a': retry.max_attempts" in str(error)
    assert "greater than or equal to 1" in str(error)


def test_a_negative_budget_is_refused() -> None:
    error = refused(wf(noop("a"), budget_usd=-1))

    assert "budget_usd" in str(error)


def test_more_than_max_steps_is_refused_with_the_count_and_the_limit() -> None:
    error = refused(wf(*(noop(f"s{i}") for i in range(MAX_STEPS + 1))))

    assert str(MAX_STEPS + 1) in str(error)
    assert f"limit is {MAX_STEPS}" in str(error)


def test_exactly_max_steps_is_accepted() -> None:
    assert len(parse_workflow(wf(*(noop(f"s{i}") for i in range(MAX_STEPS)))).steps) == MAX_STEPS


# -- check_workflow: beyond the shape -------------------------------------------------------------------------------


def test_a_python_step_naming_an_unregistered_function_is_refused() -> None:
    spec = parse_workflow(wf({"name": "crunch", "uses": "python", "with": {"function": "os.system"}}))

    with pytest.raises(WorkflowDefinitionError) as info:
        check_workflow(spec, FunctionRegistry())

    assert info.value.step == "crunch"
    assert "step 'crunch'" in str(info.value)
    assert "'os.system'" in str(info.value)


def test_a_python_step_naming_a_registered_function_is_accepted() -> None:
    registry = FunctionRegistry()

    def crunch(ctx: Any) -> int:
        return 1

    registry.register(crunch, "mine.crunch")
    spec = parse_workflow(wf({"name": "crunch", "uses": "python", "with": {"function": "mine.crunch"}}))

    check_workflow(spec, registry)


def test_a_prompt_template_that_does_not_parse_is_refused_naming_the_step() -> None:
    spec = parse_workflow(wf(llm("a", "ok"), llm("broken", "Summarise {{ steps.a.output.text ", "a")))

    with pytest.raises(WorkflowDefinitionError) as info:
        check_workflow(spec, FunctionRegistry())

    assert info.value.step == "broken"
    assert "step 'broken'" in str(info.value)
    assert "does not parse" in str(info.value)


def test_a_system_template_that_does_not_parse_is_refused_naming_the_step() -> None:
    spec = parse_workflow(wf(llm("a", "ok", system="You are {% if %}")))

    with pytest.raises(WorkflowDefinitionError, match="does not parse") as info:
        check_workflow(spec, FunctionRegistry())

    assert info.value.step == "a"


def test_a_template_reading_a_step_that_is_not_an_ancestor_suggests_adding_it_to_depends_on() -> None:
    spec = parse_workflow(
        wf(llm("research", "r"), llm("blog", "b"), llm("post", "{{ steps.research.output.text }}", "blog"))
    )

    with pytest.raises(WorkflowDefinitionError) as info:
        check_workflow(spec, FunctionRegistry())

    message = str(info.value)
    assert info.value.step == "post"
    assert "step 'post'" in message
    assert "steps.research" in message
    assert "does not depend on" in message
    assert "add 'research' to depends_on" in message


def test_a_template_reading_an_unknown_step_says_so_and_suggests_depends_on() -> None:
    spec = parse_workflow(wf(llm("a", "x"), llm("b", "{{ steps.nonexistent.output.text }}", "a")))

    with pytest.raises(WorkflowDefinitionError) as info:
        check_workflow(spec, FunctionRegistry())

    message = str(info.value)
    assert info.value.step == "b"
    assert "steps.nonexistent" in message
    assert "unknown step" in message
    assert "add 'nonexistent' to depends_on" in message


def test_a_system_prompt_reading_a_non_ancestor_is_refused_too() -> None:
    spec = parse_workflow(wf(llm("a", "x"), llm("b", "y", system="Context: {{ steps.a.output.text }}")))

    with pytest.raises(WorkflowDefinitionError, match="add 'a' to depends_on"):
        check_workflow(spec, FunctionRegistry())


def test_a_template_reading_a_grandparent_is_accepted() -> None:
    spec = parse_workflow(
        wf(
            llm("research", "r"),
            llm("blog", "{{ steps.research.output.text }}", "research"),
            llm("social", "{{ steps.research.output.text }} {{ steps.blog.output.text }}", "blog"),
        )
    )

    check_workflow(spec, FunctionRegistry())


def test_a_template_reading_a_grandparent_by_subscript_is_accepted() -> None:
    spec = parse_workflow(
        wf(
            llm("research", "r"),
            llm("blog", "b", "research"),
            llm("social", "{{ steps['research'].output.text }}", "blog"),
        )
    )

    check_workflow(spec, FunctionRegistry())


def test_a_template_reading_a_non_ancestor_by_subscript_is_refused() -> None:
    spec = parse_workflow(wf(llm("a", "x"), llm("b", "{{ steps['a'].output.text }}")))

    with pytest.raises(WorkflowDefinitionError, match="add 'a' to depends_on"):
        check_workflow(spec, FunctionRegistry())


# -- definitions and their hashes ------------------------------------------------------------------------------------


CONTENT_LIKE: dict[str, Any] = {
    "name": "content",
    "version": 3,
    "description": "research then write",
    "inputs": {"topic": {"type": "string", "minLength": 1}, "audience": {"type": "string", "default": "devs"}},
    "timeout_s": 600,
    "budget_usd": 0.5,
    "steps": [
        llm("research", "Research {{ inputs.topic }}", model="claude-haiku-4-5", max_tokens=400),
        {
            **llm("blog", "Blog from {{ steps.research.output.text }}", "research", simulate={"latency_s": 0.5}),
            "retry": {"max_attempts": 5, "backoff_s": 0.5},
            "timeout_s": 120,
        },
        llm("seo", "SEO for {{ steps.blog.output.text }}", "blog", output_schema={"type": "object"}),
        {"name": "review", "uses": "python", "depends_on": ["seo"], "with": {"function": "x.review", "args": {"n": 1}}},
        noop("done", "review", "blog", queue="cpu"),
    ],
}


def test_a_valid_workflow_round_trips_through_its_json_form_with_the_same_hash() -> None:
    spec = parse_workflow(copy.deepcopy(CONTENT_LIKE))

    again = parse_workflow(spec.to_json_dict())

    assert again == spec
    assert again.definition_hash == spec.definition_hash
    assert again.to_json_dict() == spec.to_json_dict()
    assert isinstance(spec, WorkflowSpec)
    assert [s.name for s in again.steps] == ["research", "blog", "seo", "review", "done"]


def test_the_hash_does_not_depend_on_key_order_or_spelled_out_defaults() -> None:
    spec = parse_workflow(copy.deepcopy(CONTENT_LIKE))
    reordered = dict(reversed(list(copy.deepcopy(CONTENT_LIKE).items())))
    explicit = copy.deepcopy(CONTENT_LIKE)
    explicit["steps"][0]["with"]["max_tokens"] = 400
    explicit["steps"][4]["depends_on"] = ["review", "blog"]

    assert parse_workflow(reordered).definition_hash == spec.definition_hash
    assert parse_workflow(explicit).definition_hash == spec.definition_hash


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(version=4),
        lambda d: d.update(name="content2"),
        lambda d: d["steps"][0]["with"].update(max_tokens=401),
        lambda d: d["steps"][0]["with"].update(prompt="Research {{ inputs.topic }}!"),
        lambda d: d["steps"][1].update(retry={"max_attempts": 4, "backoff_s": 0.5}),
        lambda d: d["steps"][4].update(depends_on=["review"]),
        lambda d: d["inputs"]["topic"].update(minLength=2),
        lambda d: d["steps"][3]["with"]["args"].update(n=2),
    ],
    ids=["version", "name", "max_tokens", "prompt", "retry", "depends_on", "input-schema", "python-args"],
)
def test_a_different_definition_has_a_different_hash(change: Any) -> None:
    changed = copy.deepcopy(CONTENT_LIKE)
    change(changed)

    assert parse_workflow(changed).definition_hash != parse_workflow(copy.deepcopy(CONTENT_LIKE)).definition_hash
