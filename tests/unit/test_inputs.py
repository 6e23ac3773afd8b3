"""Run inputs: checked against the workflow's schema, defaults filled, CLI ``KEY=VALUE`` pairs read by type."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.definition.inputs import input_schema, parse_cli_inputs, validate_inputs
from orchestrator.definition.spec import WorkflowSpec, parse_workflow
from orchestrator.errors import InputValidationError

pytestmark = pytest.mark.timeout(30)

LIMIT = 10_000


@pytest.fixture
def spec() -> WorkflowSpec:
    return parse_workflow(
        {
            "name": "inputs_demo",
            "inputs": {
                "topic": {"type": "string", "minLength": 1},
                "count": {"type": "integer", "minimum": 1},
                "ratio": {"type": "number"},
                "draft": {"type": "boolean", "default": False},
                "tags": {"type": "array", "items": {"type": "string"}, "default": []},
                "audience": {"type": "string", "default": "developers"},
                "options": {"type": "object"},
                "nick": {"type": ["string", "null"], "default": None},
            },
            "steps": [{"name": "a", "uses": "noop"}],
        }
    )


def valid(**overrides: Any) -> dict[str, Any]:
    return {"topic": "Redis", "count": 3, "ratio": 0.5, "options": {}, **overrides}


def test_inputs_without_a_default_are_required_and_inputs_with_one_are_not(spec: WorkflowSpec) -> None:
    assert sorted(input_schema(spec)["required"]) == ["count", "options", "ratio", "topic"]


def test_defaults_are_filled_in_and_given_values_kept(spec: WorkflowSpec) -> None:
    filled = validate_inputs(spec, valid(audience="ops"), max_bytes=LIMIT)

    assert filled == {
        "topic": "Redis",
        "count": 3,
        "ratio": 0.5,
        "options": {},
        "draft": False,
        "tags": [],
        "audience": "ops",
        "nick": None,
    }


def test_the_callers_mapping_is_not_modified(spec: WorkflowSpec) -> None:
    given = valid()
    validate_inputs(spec, given, max_bytes=LIMIT)

    assert given == valid()


def test_a_missing_required_input_is_named(spec: WorkflowSpec) -> None:
    given = valid()
    del given["count"]

    with pytest.raises(InputValidationError) as info:
        validate_inputs(spec, given, max_bytes=LIMIT)

    assert "'count'" in str(info.value)
    assert "required" in str(info.value)


@pytest.mark.parametrize(
    ("name", "value", "expected_type"),
    [
        ("count", "three", "integer"),
        ("count", 2.5, "integer"),
        ("ratio", "half", "number"),
        ("draft", "yes", "boolean"),
        ("topic", 7, "string"),
        ("tags", "a,b", "array"),
        ("options", [], "object"),
    ],
)
def test_a_value_of_the_wrong_type_is_named_with_the_wanted_type(
    spec: WorkflowSpec, name: str, value: Any, expected_type: str
) -> None:
    with pytest.raises(InputValidationError) as info:
        validate_inputs(spec, valid(**{name: value}), max_bytes=LIMIT)

    assert f"input {name!r}" in str(info.value)
    assert expected_type in str(info.value)


def test_a_schema_constraint_other_than_type_is_enforced_and_named(spec: WorkflowSpec) -> None:
    with pytest.raises(InputValidationError) as info:
        validate_inputs(spec, valid(count=0), max_bytes=LIMIT)

    assert "input 'count'" in str(info.value)
    assert "minimum" in str(info.value) or "less than" in str(info.value)


def test_an_error_inside_a_nested_input_names_its_path(spec: WorkflowSpec) -> None:
    with pytest.raises(InputValidationError) as info:
        validate_inputs(spec, valid(tags=["ok", 5]), max_bytes=LIMIT)

    assert "input 'tags.1'" in str(info.value)


def test_an_unknown_input_is_named_and_the_declared_ones_listed(spec: WorkflowSpec) -> None:
    with pytest.raises(InputValidationError) as info:
        validate_inputs(spec, valid(tpoic="typo"), max_bytes=LIMIT)

    message = str(info.value)
    assert "'tpoic'" in message
    assert "audience, count, draft, nick, options, ratio, tags, topic" in message


def test_a_misspelled_input_is_named_with_the_close_match_before_the_missing_one(spec: WorkflowSpec) -> None:
    given = {k: v for k, v in valid(tpoic="typo").items() if k != "topic"}

    with pytest.raises(InputValidationError) as info:
        validate_inputs(spec, given, max_bytes=LIMIT)

    assert str(info.value).startswith("input 'tpoic' is not an input of workflow 'inputs_demo'; did you mean 'topic'?")


def test_several_unknown_inputs_name_the_first_and_count_the_others(spec: WorkflowSpec) -> None:
    with pytest.raises(InputValidationError, match=r"^input 'aaa' is not an input .* \(2 more unknown\)"):
        validate_inputs(spec, valid(zzz=1, aaa=2, mmm=3), max_bytes=LIMIT)


def test_a_long_unknown_key_is_cut_in_the_message(spec: WorkflowSpec) -> None:
    with pytest.raises(InputValidationError) as info:
        validate_inputs(spec, valid(**{"k" * 5000: 1}), max_bytes=LIMIT)

    assert len(str(info.value)) < 300


def test_a_workflow_without_inputs_refuses_any_and_says_it_declares_none() -> None:
    bare = parse_workflow({"name": "bare", "steps": [{"name": "a", "uses": "noop"}]})

    assert validate_inputs(bare, {}, max_bytes=LIMIT) == {}
    with pytest.raises(InputValidationError, match="no inputs"):
        validate_inputs(bare, {"x": 1}, max_bytes=LIMIT)


def test_oversized_inputs_are_refused_with_their_byte_count_and_the_limit(spec: WorkflowSpec) -> None:
    given = valid(topic="é" * 6000)
    size = len(json.dumps(given, separators=(",", ":")).encode())

    with pytest.raises(InputValidationError) as info:
        validate_inputs(spec, given, max_bytes=LIMIT)

    assert size > LIMIT
    assert f"{size} bytes" in str(info.value)
    assert f"limit is {LIMIT}" in str(info.value)


def test_inputs_exactly_at_the_limit_are_accepted(spec: WorkflowSpec) -> None:
    given = valid()
    size = len(json.dumps(given, separators=(",", ":")).encode())

    assert validate_inputs(spec, given, max_bytes=size)["topic"] == "Redis"


def test_inputs_that_are_not_json_are_refused(spec: WorkflowSpec) -> None:
    with pytest.raises(InputValidationError, match="JSON"):
        validate_inputs(spec, valid(options={"when": object()}), max_bytes=LIMIT)


# -- parse_cli_inputs ----------------------------------------------------------------------------------------------


def test_string_inputs_are_taken_verbatim_even_with_equals_signs_and_json_lookalikes(spec: WorkflowSpec) -> None:
    parsed = parse_cli_inputs(spec, ["topic=a=b", "audience=42", "nick=null"])

    assert parsed == {"topic": "a=b", "audience": "42", "nick": "null"}


def test_an_empty_value_is_an_empty_string(spec: WorkflowSpec) -> None:
    assert parse_cli_inputs(spec, ["topic="]) == {"topic": ""}


def test_non_string_inputs_are_read_as_json(spec: WorkflowSpec) -> None:
    parsed = parse_cli_inputs(spec, ["count=3", "ratio=0.25", "draft=true", 'tags=["a", "b"]', 'options={"depth": 2}'])

    assert parsed == {"count": 3, "ratio": 0.25, "draft": True, "tags": ["a", "b"], "options": {"depth": 2}}
    assert validate_inputs(spec, {**parsed, "topic": "x"}, max_bytes=LIMIT)["count"] == 3


def test_an_undeclared_input_is_read_as_a_string_and_left_for_validation_to_refuse(spec: WorkflowSpec) -> None:
    parsed = parse_cli_inputs(spec, ["extra=1"])

    assert parsed == {"extra": "1"}
    with pytest.raises(InputValidationError, match="'extra'"):
        validate_inputs(spec, valid(**parsed), max_bytes=LIMIT)


def test_a_later_pair_overrides_an_earlier_one(spec: WorkflowSpec) -> None:
    assert parse_cli_inputs(spec, ["count=1", "count=2"]) == {"count": 2}


def test_a_non_json_value_for_a_typed_input_is_an_error_naming_input_value_and_type(spec: WorkflowSpec) -> None:
    with pytest.raises(InputValidationError) as info:
        parse_cli_inputs(spec, ["topic=fine", "count=abc"])

    assert "count" in str(info.value)
    assert "'abc'" in str(info.value)
    assert "integer" in str(info.value)


@pytest.mark.parametrize("pair", ["topic", "=value", ""])
def test_a_pair_without_a_key_and_equals_sign_is_an_error(spec: WorkflowSpec, pair: str) -> None:
    with pytest.raises(InputValidationError) as info:
        parse_cli_inputs(spec, [pair])

    assert "KEY=VALUE" in str(info.value)
    assert repr(pair) in str(info.value)
