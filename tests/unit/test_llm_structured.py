"""Reading structured (JSON) output from a model's reply, and asking for it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.errors import NonRetryableStepError
from orchestrator.llm import STRUCTURED_OUTPUT_MARKER, parse_structured, structured_output_instruction

pytestmark = pytest.mark.timeout(30)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "score"],
    "additionalProperties": False,
}

VALID = {"title": "Lighthouses", "score": 4, "tags": ["coast"]}


@pytest.mark.parametrize(
    "reply",
    [
        json.dumps(VALID),
        f"  \n{json.dumps(VALID, indent=2)}\n",
        f"Here you go:\n```json\n{json.dumps(VALID, indent=2)}\n```\nAnything else?",
        f"Sure.\n```\n{json.dumps(VALID)}\n```",
        f"The document is {json.dumps(VALID)} as requested.",
        f"```json\nnot json\n```\nbut in prose: {json.dumps(VALID)}",
    ],
    ids=["bare", "padded", "json-fence", "plain-fence", "braces-in-prose", "broken-fence-then-braces"],
)
def test_the_json_document_is_found_wherever_the_reply_puts_it(reply: str) -> None:
    assert parse_structured(reply, SCHEMA) == VALID


def test_a_reply_without_json_is_invalid_output() -> None:
    with pytest.raises(NonRetryableStepError) as caught:
        parse_structured("I'm sorry, I can't produce that.", SCHEMA)
    assert caught.value.kind == "invalid_output"
    assert "not JSON" in str(caught.value)
    assert "I'm sorry" in str(caught.value)


def test_a_document_that_breaks_the_schema_names_each_failing_location() -> None:
    reply = json.dumps({"title": 7, "score": 9, "tags": ["ok", 3], "extra": True})

    with pytest.raises(NonRetryableStepError) as caught:
        parse_structured(reply, SCHEMA)

    message = str(caught.value)
    assert caught.value.kind == "invalid_output"
    assert message.startswith("output does not match the schema:")
    assert "at $.title: 7 is not of type 'string'" in message
    assert "at $.score: 9 is greater than the maximum of 5" in message
    assert "at $.tags[1]: 3 is not of type 'string'" in message
    assert "'extra' was unexpected" in message


def test_a_missing_required_property_is_named() -> None:
    with pytest.raises(NonRetryableStepError) as caught:
        parse_structured('{"title": "x"}', SCHEMA)
    assert "'score' is a required property" in str(caught.value)


def test_many_failures_are_summarised_not_listed_in_full() -> None:
    schema = {"type": "array", "items": {"type": "integer"}}
    with pytest.raises(NonRetryableStepError) as caught:
        parse_structured(json.dumps(["a"] * 8), schema)
    assert "(and 3 more)" in str(caught.value)


def test_a_schema_that_is_not_a_json_schema_is_reported_as_such() -> None:
    with pytest.raises(NonRetryableStepError) as caught:
        parse_structured(json.dumps(VALID), {"type": "banana"})
    assert caught.value.kind == "invalid_schema"


def test_formats_are_checked() -> None:
    schema = {"type": "object", "properties": {"contact": {"type": "string", "format": "email"}}}
    assert parse_structured('{"contact": "a@example.com"}', schema) == {"contact": "a@example.com"}
    with pytest.raises(NonRetryableStepError) as caught:
        parse_structured('{"contact": "nobody"}', schema)
    assert "is not a 'email'" in str(caught.value)


def test_the_instruction_is_the_marker_followed_by_the_schema() -> None:
    instruction = structured_output_instruction(SCHEMA)

    marker_line, schema_text = instruction.split("\n", 1)

    assert marker_line == STRUCTURED_OUTPUT_MARKER
    assert json.loads(schema_text) == SCHEMA


def test_a_schema_is_checked_and_compiled_once_however_many_replies_it_validates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from jsonschema import Draft202012Validator

    checks: list[object] = []
    original = Draft202012Validator.check_schema
    monkeypatch.setattr(Draft202012Validator, "check_schema", lambda schema: checks.append(schema) or original(schema))
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 7}}, "required": ["n"]}

    assert [parse_structured(f'{{"n": {n}}}', schema) for n in (7, 8, 9)] == [{"n": 7}, {"n": 8}, {"n": 9}]
    with pytest.raises(NonRetryableStepError, match="minimum"):
        parse_structured('{"n": 1}', dict(reversed(list(schema.items()))))  # the same schema, keys in another order
    assert len(checks) == 1
