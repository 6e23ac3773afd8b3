"""Workflow files (YAML or JSON, one shape) and sandboxed prompt templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator.definition.files import MAX_FILE_BYTES, load_workflow_file
from orchestrator.definition.spec import LLMParams, PythonParams
from orchestrator.definition.templates import check_template, referenced_steps, render
from orchestrator.errors import NonRetryableStepError, WorkflowDefinitionError

pytestmark = pytest.mark.timeout(30)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "content_pipeline.yaml"


@pytest.fixture
def example_text() -> str:
    return EXAMPLE.read_text(encoding="utf-8")


def test_the_example_yaml_file_loads_with_its_steps_and_dependencies(tmp_path: Path, example_text: str) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(example_text, encoding="utf-8")

    spec = load_workflow_file(path)

    assert spec.name == "content_pipeline_file"
    assert spec.version == 1
    assert spec.timeout_s == 600
    assert set(spec.inputs) == {"topic", "audience"}
    assert [s.name for s in spec.steps] == [
        "research",
        "blog_post",
        "social_posts",
        "email_newsletter",
        "seo_metadata",
        "final_review",
    ]
    assert spec.steps_by_name["final_review"].depends_on == ("social_posts", "email_newsletter", "seo_metadata")
    blog = spec.steps_by_name["blog_post"]
    assert isinstance(blog.params, LLMParams)
    assert blog.retry.max_attempts == 5
    assert blog.timeout_s == 120
    assert "{{ steps.research.output.text }}" in blog.params.prompt
    assert isinstance(spec.steps_by_name["final_review"].params, PythonParams)


def test_the_same_workflow_as_json_loads_to_the_same_definition(tmp_path: Path, example_text: str) -> None:
    yaml_path = tmp_path / "pipeline.yaml"
    yaml_path.write_text(example_text, encoding="utf-8")
    json_path = tmp_path / "pipeline.json"
    json_path.write_text(json.dumps(yaml.safe_load(example_text), indent=2), encoding="utf-8")

    from_json = load_workflow_file(json_path)

    assert from_json == load_workflow_file(yaml_path)
    assert from_json.definition_hash == load_workflow_file(str(yaml_path)).definition_hash


def test_malformed_yaml_is_refused_naming_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nsteps:\n  - name: a\n    uses: noop\n  - name: b\n    with: {prompt: [x\n")

    with pytest.raises(WorkflowDefinitionError) as info:
        load_workflow_file(path)

    message = str(info.value)
    assert str(path) in message
    assert "malformed YAML" in message
    assert "line 7" in message or "line 6" in message


def test_a_yaml_indentation_error_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "indent.yaml"
    path.write_text("name: w\nsteps:\n  - name: a\n    uses: noop\n   bad: 1\n")

    with pytest.raises(WorkflowDefinitionError, match=r"malformed YAML at line 5\b"):
        load_workflow_file(path)


def test_malformed_json_is_refused_naming_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "name": "broken",\n  "steps": [\n    {"name": "a", "uses": "noop",}\n  ]\n}\n')

    with pytest.raises(WorkflowDefinitionError) as info:
        load_workflow_file(path)

    message = str(info.value)
    assert str(path) in message
    assert "malformed JSON at line 4" in message


def test_yaml_python_tags_are_refused_not_constructed(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['touch pwned']\nsteps: []\n")

    with pytest.raises(WorkflowDefinitionError, match="malformed YAML at line 1"):
        load_workflow_file(path)
    assert not (tmp_path / "pwned").exists()


def test_a_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"

    with pytest.raises(WorkflowDefinitionError) as info:
        load_workflow_file(path)

    assert str(path) in str(info.value)
    assert "No such file" in str(info.value)


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)

    with pytest.raises(WorkflowDefinitionError) as info:
        load_workflow_file(path)

    assert f"{MAX_FILE_BYTES + 1} bytes" in str(info.value)
    assert f"limit is {MAX_FILE_BYTES}" in str(info.value)


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\nsteps: []\n".encode("latin-1"))

    with pytest.raises(WorkflowDefinitionError, match="cannot read"):
        load_workflow_file(path)


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("", "NoneType"), ("just words\n", "str")])
def test_a_yaml_file_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text)

    with pytest.raises(WorkflowDefinitionError, match=f"must be a mapping, got {kind}"):
        load_workflow_file(path)


def test_an_invalid_workflow_in_a_well_formed_file_names_the_step(tmp_path: Path) -> None:
    path = tmp_path / "cycle.yaml"
    path.write_text(
        "name: w\nsteps:\n  - {name: a, uses: noop, depends_on: [b]}\n  - {name: b, uses: noop, depends_on: [a]}\n"
    )

    with pytest.raises(WorkflowDefinitionError, match=r"dependency cycle: (a -> b -> a|b -> a -> b)"):
        load_workflow_file(path)


# -- templates -----------------------------------------------------------------------------------------------------

CONTEXT = {"inputs": {"topic": "Redis", "tags": ["a"]}, "steps": {"research": {"output": {"text": "facts"}}}}


def test_a_template_renders_inputs_and_upstream_outputs() -> None:
    rendered = render("About {{ inputs.topic }}: {{ steps.research.output.text }}", CONTEXT)

    assert rendered == "About Redis: facts"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ inputs.__class__ }}",
        "{{ inputs.topic.__class__.__base__ }}",
        "{{ steps.research.__init__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ lipsum.__globals__ }}",
        "{{ self.__init__ }}",
        "{{ inputs.tags.append('x') }}",
        "{{ inputs.update({'topic': 'x'}) }}",
    ],
)
def test_the_sandbox_refuses_escapes_and_mutation(source: str) -> None:
    context = {"inputs": {"topic": "Redis", "tags": ["a"]}, "steps": {"research": {"output": {"text": "facts"}}}}

    with pytest.raises(NonRetryableStepError) as info:
        render(source, context)

    assert info.value.kind == "template_error"
    assert "unsafe" in str(info.value)
    assert context["inputs"] == {"topic": "Redis", "tags": ["a"]}


@pytest.mark.parametrize(
    ("source", "named"),
    [("{{ inputs.missing }}", "missing"), ("{{ nope }}", "nope"), ("{{ steps.other.output.text }}", "other")],
)
def test_an_undefined_variable_is_an_error_naming_it(source: str, named: str) -> None:
    with pytest.raises(NonRetryableStepError) as info:
        render(source, CONTEXT)

    assert info.value.kind == "template_error"
    assert f"'{named}'" in str(info.value)


@pytest.mark.parametrize("source", ["{{ 1 / 0 }}", "{{ inputs.topic + 1 }}", "{{ range(10 ** 9) | list }}"])
def test_any_rendering_failure_is_a_non_retryable_template_error(source: str) -> None:
    with pytest.raises(NonRetryableStepError) as info:
        render(source, CONTEXT)

    assert info.value.kind == "template_error"
    assert str(info.value).startswith("template failed")


def test_check_template_refuses_a_template_that_does_not_parse_naming_the_step() -> None:
    with pytest.raises(WorkflowDefinitionError) as info:
        check_template("{% if inputs.topic %}unclosed", step="writer")

    assert info.value.step == "writer"
    assert "step 'writer'" in str(info.value)
    assert "does not parse" in str(info.value)


def test_check_template_accepts_a_template_that_parses() -> None:
    check_template("{% for t in inputs.tags %}{{ t }}{% endfor %}", step="writer")


def test_referenced_steps_finds_every_step_read_by_attribute_or_subscript() -> None:
    source = (
        "{{ steps.a.output.text }} {% if steps.b.output.word_count > 3 %}{{ steps['c'].output }}{% endif %}"
        "{% for line in steps.d.output.text.splitlines() %}{{ line }}{% endfor %}"
    )

    assert referenced_steps(source) == {"a", "b", "c", "d"}


def test_referenced_steps_ignores_names_that_only_look_like_steps() -> None:
    source = "{{ inputs.steps }} {{ inputs.topic.steps }} {{ step.a }} {% set s = 'x' %}{{ s }}"

    assert referenced_steps(source) == set()
