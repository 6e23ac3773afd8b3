"""Hostile workflow definitions, fuzzed: whatever a file or an API body holds, the orchestrator either accepts a valid
workflow or refuses it with one of its own errors and a message, never with a stray KeyError, TypeError or
RecursionError.

Cases are generated around the real shape (names, ``depends_on``, cycles, unknown keys, wrong types, huge strings,
deep nesting, odd unicode, odd Jinja, conditions), as data, as YAML and JSON text (also mutated byte by byte), and
through ``orchestrator validate FILE``. About 1,500 cases at full size (``bash scripts/fuzz.sh``); the suite runs a
quarter (``tests/fuzzing.py``).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.cli import main
from orchestrator.definition.conditions import check_condition, evaluate_condition
from orchestrator.definition.files import load_workflow_file, parse_document
from orchestrator.definition.inputs import validate_inputs
from orchestrator.definition.registry import FunctionRegistry
from orchestrator.definition.spec import LLMParams, PythonParams, WorkflowSpec, parse_workflow
from orchestrator.definition.templates import check_template, referenced_steps, render
from orchestrator.definition.validation import check_workflow
from orchestrator.errors import (
    InputValidationError,
    NonRetryableStepError,
    OrchestratorError,
    WorkflowDefinitionError,
)
from tests.fuzzing import fuzz

pytestmark = pytest.mark.timeout(180)

T = TypeVar("T")


REGISTRY = FunctionRegistry()
REGISTRY.register(lambda ctx, **_: {"ok": True}, "fuzz.echo")

# -- strategies ----------------------------------------------------------------------------------------------------

STEP_NAMES = ["a", "b", "c", "research", "blog_post", "_private", "x" * 64]
WEIRD = [
    "",
    " ",
    "\x00",
    "\u202e",
    "\ud800",
    "\ufeff",
    "é",
    "名前",
    "🙂",
    "a" * 65,
    "x" * 5000,
    "1a",
    "a-b",
    "a.b",
    "a b",
    "__class__",
    "${HOME}",
    "'; DROP",
    "\n",
    "null",
    "True",
]
TEMPLATE_PIECES = [
    # Within every per-value limit, far past the total allocation budget.
    "{% set ns = namespace(l=[]) %}{% for i in range(8) %}{% set ns.l = ns.l + ['x' * 16000000] %}{% endfor %}",
    "{{ ('x ' * 8000000).split()|length }}",
    "{{ ('x' * 4000000)|sort|length }}",
    "{{ inputs.topic }}",
    "{{ steps.a.output.text }}",
    "{{ steps['b'].output }}",
    "{{ steps.zzz.output }}",
    "{{ run_id }} {{ attempt }}",
    "{{ inputs.topic|upper }}",
    "{% for t in inputs.tags %}{{ loop.index }}{{ t }}{% endfor %}",
    "{% if inputs.topic %}",
    "{% endif %}",
    "{% for x in inputs.tags %}",
    "{% endfor %}",
    "{% raw %}{{ x }}",
    "{% endraw %}",
    "{% macro m(a) %}{{ a }}{% endmacro %}{{ m(1) }}",
    "{% set x = 1 %}{{ x }}",
    "{% include 'other' %}",
    "{% extends 'base' %}",
    "{% import 'lib' as lib %}",
    "{# comment #}",
    "{{",
    "}}",
    "{%",
    "%}",
    "{{ (",
    "{{ 1/0 }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ self._TemplateReference__context }}",
    "{{ lipsum.__globals__ }}",
    "{{ lipsum(10**6) }}",
    "{{ config }}",
    "{{ request }}",
    "{{ inputs|attr('__class__') }}",
    "{{ '%s'|format(inputs) }}",
    "{{ '%0999999999d'|format(1) }}",
    "{{ inputs.__class__ }}",
    "{{ range(10**9)|list }}",
    "{{ 'a' * 10**10 }}",
    "{{ 10 ** (10 ** 10) }}",
    "{{ 5|round(-1000000000) }}",
    "{{ 'x'|center(10**10) }}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "{{ inputs.tags.append(1) }}",
    *WEIRD,
]
CONDITION_PIECES = [
    "(" + " + ".join(["['x' * 16000000]"] * 6) + ")|length > 0",
    "('x ' * 8000000)|wordcount > 0",
    "steps.a.output.word_count > 500",
    "inputs.topic == 'x'",
    "steps['b'].output.text|length < 3",
    " and ",
    " or ",
    "not ",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "==",
    "1",
    "'s'",
    "inputs.__class__",
    "''.__class__",
    "inputs['__class__']",
    "inputs|attr('__class__')",
    "lipsum()",
    "range(10)",
    "'a' * 10**10 > ''",
    "inputs.topic|center(10**10)",
    "10 ** (10 ** 10) > 1",
    "steps.zzz.output",
    "x",
    "{{ inputs.topic }}",
    *WEIRD,
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(WEIRD),
)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
names = st.one_of(st.sampled_from(STEP_NAMES), st.sampled_from(WEIRD), st.text(max_size=70), junk)
# Expressions nested deeper than Jinja's parser or code generator (or Python's own parser) can take.
nested = st.builds(
    lambda depth, around: around[0] * depth + "1" + around[1] * depth,
    st.one_of(st.sampled_from([150, 400, 1000, 3000]), st.integers(min_value=1, max_value=3000)),
    st.sampled_from([("(", ")"), ("[", "]"), ("-", ""), ("not ", ""), ("[", "][0]")]),
)
templates = st.lists(
    st.one_of(st.sampled_from(TEMPLATE_PIECES), st.text(max_size=12), nested.map("{{ {} }}".format)),
    min_size=0,
    max_size=6,
).map("".join)
conditions = st.lists(
    st.one_of(st.sampled_from(CONDITION_PIECES), st.text(max_size=6), nested), min_size=0, max_size=6
).map("".join)


def maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``value``, sometimes anything at all."""
    return st.one_of(value, value, value, junk)


def params_for(kind: Any) -> st.SearchStrategy[Any]:
    """A plausible ``with:`` for a step kind, with fields of the wrong type now and then."""
    if kind == "llm":
        return st.fixed_dictionaries(
            {"prompt": maybe(templates)},
            optional={
                "model": maybe(st.sampled_from(["claude-haiku-4-5", "", "x" * 200])),
                "max_tokens": maybe(st.integers(-5, 100_000)),
                "system": maybe(templates),
                "temperature": maybe(st.floats(-1, 2)),
                "output_schema": maybe(st.sampled_from([{"type": "object"}, {"type": "nope"}, {"minLength": -1}])),
                "simulate": maybe(
                    st.fixed_dictionaries(
                        {},
                        optional={
                            "latency_s": st.floats(-1, 1),
                            "errors": st.lists(st.sampled_from(["rate_limit", "boom", "timeout"])),
                        },
                    )
                ),
                "reply_cache": maybe(st.sampled_from(["run", "shared", "off", "forever"])),
                "unknown": junk,
            },
        )
    if kind == "python":
        functions = st.sampled_from(["fuzz.echo", "os.system", "builtins.eval", "subprocess.run", "", "fuzz.nope"])
        return st.fixed_dictionaries(
            {"function": maybe(functions)},
            optional={"args": maybe(st.dictionaries(st.text(max_size=5), junk, max_size=3)), "unknown": junk},
        )
    if kind == "approval":
        return st.fixed_dictionaries(
            {"approvers": maybe(st.lists(st.text(max_size=10), max_size=3))},
            optional={
                "message": maybe(templates),
                "timeout_s": maybe(st.floats(-10, 1e9)),
                "on_timeout": maybe(st.sampled_from(["approve", "reject", "fail", "explode"])),
            },
        )
    return st.one_of(st.just({}), junk)


@st.composite
def step_dicts(draw: st.DrawFn) -> Any:
    """One step: mostly the real shape, with names, kinds and fields drawn from good and bad values."""
    kind = draw(st.one_of(st.sampled_from(["llm", "python", "noop", "approval"]), junk))
    step: dict[str, Any] = {"name": draw(names), "uses": kind}
    if draw(st.booleans()):
        step["with"] = draw(params_for(kind))
    optional = {
        "depends_on": maybe(st.lists(names, max_size=4)),
        "retry": maybe(
            st.fixed_dictionaries({}, optional={"max_attempts": st.integers(-2, 200), "backoff_s": st.floats(-1, 5000)})
        ),
        "timeout_s": maybe(st.floats(-1, 1e7)),
        "queue": maybe(st.sampled_from(["llm", "cpu", "bad queue!", ""])),
        "condition": maybe(conditions),
        "condition_function": maybe(st.sampled_from(["fuzz.echo", "fuzz.nope", ""])),
        "trigger_rule": maybe(st.sampled_from(["all_success", "all_done", "none_failed", "one_success", "never"])),
        "cache": maybe(st.booleans()),
        "params": junk,
        "mystery": junk,
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), unique=True, max_size=4)):
        step[key] = draw(optional[key])
    return step if draw(st.integers(0, 19)) else draw(junk)


input_schemas = st.dictionaries(
    st.one_of(st.sampled_from(["topic", "tags", "n", "audience"]), st.text(max_size=8)),
    maybe(
        st.fixed_dictionaries(
            {"type": maybe(st.sampled_from(["string", "integer", "array", "object", "number", "nope"]))},
            optional={"default": junk, "minLength": maybe(st.integers(-1, 5)), "items": junk},
        )
    ),
    max_size=4,
)


@st.composite
def workflow_dicts(draw: st.DrawFn) -> Any:
    """A whole workflow document: the real shape with good and bad values, unknown keys now and then."""
    data: dict[str, Any] = {
        "name": draw(maybe(st.sampled_from(["wf", "content.pipeline-2", "", "9lives", "x" * 101]))),
        "steps": draw(st.one_of(st.lists(step_dicts(), max_size=6), st.lists(step_dicts(), max_size=6), junk)),
    }
    optional = {
        "version": maybe(st.integers(-3, 10**12)),
        "description": maybe(st.text(max_size=30)),
        "inputs": maybe(input_schemas),
        "timeout_s": maybe(st.floats(-1, 1e6)),
        "budget_usd": maybe(st.floats(-1, 10)),
        "unknown_key": junk,
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), unique=True, max_size=4)):
        data[key] = draw(optional[key])
    return data if draw(st.integers(0, 19)) else draw(junk)


BASE: dict[str, Any] = {
    "name": "fuzz_base",
    "version": 2,
    "inputs": {"topic": {"type": "string"}, "tags": {"type": "array", "default": ["a"]}},
    "steps": [
        {"name": "a", "uses": "llm", "with": {"prompt": "Research {{ inputs.topic }}", "max_tokens": 50}},
        {"name": "b", "uses": "llm", "depends_on": ["a"], "with": {"prompt": "Write from {{ steps.a.output.text }}"}},
        {"name": "c", "uses": "python", "depends_on": ["a"], "with": {"function": "fuzz.echo", "args": {"n": 1}}},
        {
            "name": "d",
            "uses": "noop",
            "depends_on": ["b", "c"],
            "condition": "steps.b.output.word_count > 5",
            "trigger_rule": "all_done",
        },
        {"name": "e", "uses": "approval", "depends_on": ["d"], "with": {"approvers": ["editor"], "timeout_s": 60}},
    ],
}


def paths_of(data: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every location in a JSON document."""
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from paths_of(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from paths_of(value, (*prefix, index))


@st.composite
def mutated_base(draw: st.DrawFn) -> Any:
    """The valid base workflow after a few random edits: values replaced, keys dropped or added, steps duplicated,
    dependencies rewired (cycles included)."""
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in paths_of(data) if p]
        op = draw(st.sampled_from(["replace", "delete", "add", "duplicate", "rewire"]))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        if op == "replace":
            parent[path[-1]] = draw(st.one_of(junk, names, templates, conditions))
        elif op == "delete":
            del parent[path[-1]]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = draw(junk)
        elif op == "duplicate" and isinstance(data.get("steps"), list) and data["steps"]:
            data["steps"].append(copy.deepcopy(draw(st.sampled_from(data["steps"]))))
        elif op == "rewire" and isinstance(data.get("steps"), list):
            for step in data["steps"]:
                if isinstance(step, dict) and draw(st.booleans()):
                    step["depends_on"] = draw(st.lists(st.sampled_from([*"abcdez"]), max_size=3, unique=True))
    return data


@st.composite
def mutated_text(draw: st.DrawFn) -> tuple[str, str]:
    """A workflow dumped as YAML or JSON text, then edited character by character; returns ``(text, suffix)``."""
    data = draw(st.one_of(mutated_base(), workflow_dicts()))
    suffix = draw(st.sampled_from([".yaml", ".json"]))
    try:
        text = json.dumps(data) if suffix == ".json" else yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    except (ValueError, yaml.YAMLError):
        text = str(data)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "truncate", "yaml"]))
        if op == "insert":
            text = (
                text[:at]
                + draw(
                    st.one_of(
                        st.sampled_from(["{", "[", ":", "- ", "\t", '"', "\\", "&a", "*a", "!!"]), st.text(max_size=4)
                    )
                )
                + text[at:]
            )
        elif op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 20)) :]
        elif op == "truncate":
            text = text[:at]
        else:
            text = draw(st.sampled_from(YAML_ODDITIES)) + "\n" + text
    return text, suffix


YAML_ODDITIES = [
    "!!python/object/apply:os.system ['id']",
    "%YAML 1.1",
    "---",
    "? [a, b]\n: 1",
    "steps: !!set {a: null}",
    "name: !!binary aGVsbG8=",
    "a: &a [x, x]\nb: [*a, *a]",
    "version: " + "9" * 5000,
    "version: 0x1F",
    "timeout_s: .nan",
    "budget_usd: .inf",
    "name: 2001-12-14",
    "steps: [{name: a, uses: [llm]}]",
    "steps: [{name: a, uses: {llm: 1}}]",
    "[" * 2000 + "]" * 2000,
]


def attempt(call: Callable[[], T], refused: type[OrchestratorError]) -> tuple[T | None, OrchestratorError | None]:
    """``call()``'s value, or the ``refused`` error it raised; any other exception propagates and fails the test."""
    try:
        return call(), None
    except refused as exc:
        return None, exc


def parsed_and_checked(data: Any) -> WorkflowSpec:
    spec = parse_workflow(data)
    check_workflow(spec, REGISTRY)
    return spec


def accepted_or_refused(data: Any) -> WorkflowSpec | None:
    """Parse and validate ``data``; a refusal must be a WorkflowDefinitionError with a message, nothing else."""
    spec, error = attempt(lambda: parsed_and_checked(data), WorkflowDefinitionError)
    if spec is None:
        assert str(error).strip(), "an error without a message"
        return None
    assert_is_a_valid_spec(spec)
    return spec


def assert_is_a_valid_spec(spec: WorkflowSpec) -> None:
    """What an accepted workflow guarantees: a DAG of unique steps reading only their ancestors and registered code,
    and a JSON form that parses back to the same definition."""
    names = [s.name for s in spec.steps]
    assert len(names) == len(set(names))
    assert len(spec.graph.topological_order) == len(names)
    for step in spec.steps:
        ancestors = spec.graph.ancestors(step.name)
        assert set(step.depends_on) <= set(names)
        if isinstance(step.params, PythonParams):
            assert step.params.function in REGISTRY
        if isinstance(step.params, LLMParams):
            assert referenced_steps(step.params.prompt) <= ancestors
    again = parse_workflow(json.loads(json.dumps(spec.to_json_dict())))
    assert again.definition_hash == spec.definition_hash


# -- definitions as data ---------------------------------------------------------------------------------------------


@fuzz(400)
@given(data=workflow_dicts(), inputs=junk)
def test_any_workflow_document_is_either_a_valid_spec_or_refused_with_a_workflow_error(data: Any, inputs: Any) -> None:
    spec = accepted_or_refused(data)

    if spec is not None and isinstance(inputs, dict):
        filled, error = attempt(lambda: validate_inputs(spec, inputs, max_bytes=4096), InputValidationError)
        assert str(error).strip() if filled is None else set(filled) <= set(spec.inputs)


@fuzz(300)
@given(data=mutated_base())
def test_a_valid_workflow_edited_at_random_stays_valid_or_is_refused_naming_the_problem(data: Any) -> None:
    accepted_or_refused(data)


@fuzz(60)
@given(depth=st.integers(min_value=1, max_value=20_000), where=st.sampled_from(["inputs", "args", "with", "steps"]))
def test_deeply_nested_definitions_are_refused_or_accepted_never_a_recursion_error(depth: int, where: str) -> None:
    nested: Any = "leaf"
    for _ in range(depth):
        nested = {"k": nested} if depth % 2 else [nested]
    data = copy.deepcopy(BASE)
    if where == "inputs":
        data["inputs"]["deep"] = {"type": "object", "default": nested}
    elif where == "args":
        data["steps"][2]["with"]["args"] = {"deep": nested}
    elif where == "with":
        data["steps"][0]["with"]["output_schema"] = {"type": "object", "properties": {"p": nested}}
    else:
        data["steps"] = nested

    accepted_or_refused(data)


@fuzz(40)
@given(depth=st.integers(min_value=1, max_value=5_000), suffix=st.sampled_from([".json", ".yaml"]))
def test_deeply_nested_text_is_a_workflow_error_not_a_recursion_error(depth: int, suffix: str) -> None:
    text = "[" * depth + "]" * depth

    with pytest.raises(WorkflowDefinitionError) as refused:
        parse_workflow(parse_document(text, source=f"deep{suffix}"))

    assert str(refused.value).strip()


# -- definitions as text ---------------------------------------------------------------------------------------------


@fuzz(300)
@given(case=mutated_text())
def test_yaml_and_json_text_edited_at_random_parses_to_a_valid_spec_or_a_workflow_error(case: tuple[str, str]) -> None:
    text, suffix = case
    data, error = attempt(lambda: parse_document(text, source=f"fuzz{suffix}"), WorkflowDefinitionError)

    if error is not None:
        assert str(error).startswith(f"fuzz{suffix}: malformed "), str(error)
    else:
        accepted_or_refused(data)


@fuzz(100)
@given(text=st.text(max_size=300), suffix=st.sampled_from([".json", ".yaml"]))
def test_arbitrary_text_is_a_valid_spec_or_a_workflow_error(text: str, suffix: str) -> None:
    data, error = attempt(lambda: parse_document(text, source=f"any{suffix}"), WorkflowDefinitionError)

    if error is None:
        accepted_or_refused(data)


@pytest.fixture(scope="module")
def file_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-files-") as directory:
        yield Path(directory)


@fuzz(100)
@given(case=mutated_text(), raw=st.binary(max_size=40))
def test_the_file_loader_accepts_or_refuses_every_file_including_bytes_that_are_not_utf8(
    *, file_dir: Path, case: tuple[str, str], raw: bytes
) -> None:
    text, suffix = case
    path = file_dir / f"{uuid.uuid4().hex}{suffix}"
    path.write_bytes(text.encode("utf-8", "surrogatepass") + raw)
    try:
        spec, error = attempt(lambda: load_workflow_file(path), WorkflowDefinitionError)
    finally:
        path.unlink()

    assert isinstance(spec, WorkflowSpec) if error is None else str(error).strip()


# -- templates and conditions ----------------------------------------------------------------------------------------

CONTEXT = {
    "inputs": {"topic": "Redis", "tags": ["a", "b"], "n": 3},
    "steps": {"a": {"output": {"text": "facts", "word_count": 1}}, "b": {"output": {"text": "more"}}},
    "run_id": "r1",
    "attempt": 1,
}


@fuzz(250)
@given(source=templates)
def test_any_template_is_checked_and_rendered_to_text_or_a_template_error(source: str) -> None:
    _, invalid = attempt(lambda: check_template(source, step="s"), WorkflowDefinitionError)
    rendered, failed = attempt(
        lambda: render(source, copy.deepcopy(CONTEXT), max_chars=1_000_000), NonRetryableStepError
    )

    if isinstance(invalid, WorkflowDefinitionError):
        assert invalid.step == "s"
        assert "step 's'" in str(invalid)
    if isinstance(failed, NonRetryableStepError):
        assert failed.kind in {"template_error", "template_limit", "prompt_too_large"}, failed.kind
        assert str(failed).strip()
    else:
        assert isinstance(rendered, str)
        assert len(rendered) <= 1_000_000


@fuzz(200)
@given(source=conditions)
def test_any_condition_is_checked_and_evaluated_to_a_bool_or_a_condition_error(source: str) -> None:
    _, invalid = attempt(lambda: check_condition(source, step="s", upstream={"a", "b"}), WorkflowDefinitionError)
    inputs = dict(CONTEXT["inputs"])
    result, failed = attempt(
        lambda: evaluate_condition(source, inputs=inputs, outputs={"a": {"word_count": 1}}), NonRetryableStepError
    )

    if isinstance(invalid, WorkflowDefinitionError):
        assert invalid.step == "s"
    if isinstance(failed, NonRetryableStepError):
        assert failed.kind in {"condition_error", "template_limit"}, failed.kind
    else:
        assert isinstance(result, bool)


# -- the CLI ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli() -> Iterator[CliRunner]:
    # No ORCH_IMPORTS: validate must not need the test modules (their functions are simply unregistered there).
    saved = os.environ.pop("ORCH_IMPORTS", None)
    try:
        yield CliRunner()
    finally:
        if saved is not None:
            os.environ["ORCH_IMPORTS"] = saved


@fuzz(80)
@given(case=st.one_of(mutated_text(), workflow_dicts().map(lambda d: (json.dumps(d, default=str), ".json"))))
def test_orchestrator_validate_prints_ok_or_one_error_line_and_never_a_traceback(
    cli: CliRunner, file_dir: Path, case: tuple[str, str]
) -> None:
    text, suffix = case
    path = file_dir / f"{uuid.uuid4().hex}{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        result = cli.invoke(main, ["validate", str(path)])
    finally:
        path.unlink()

    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        assert result.stdout.startswith("ok: "), result.stdout
    else:
        # One line of printable text: a control character from the file must not end the line or reach the terminal.
        line = result.stderr.removesuffix("\n")
        assert line.startswith("error: "), result.stderr
        assert line.isprintable(), result.stderr


def test_the_fuzzers_can_tell_a_stray_exception_from_a_workflow_error() -> None:
    """The property the fuzz tests check fails on a stray exception (guarding against an over-broad ``except``)."""

    class Stray(dict[str, Any]):
        def get(self, *_: Any) -> Any:
            raise KeyError("stray")

    with pytest.raises(KeyError):
        accepted_or_refused(Stray(name="x", steps=[]))
