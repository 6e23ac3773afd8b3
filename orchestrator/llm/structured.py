"""Structured (JSON) output: how it is asked for in the system prompt, and how a reply is read back.

The request side is :func:`structured_output_instruction`: a marker line followed by the JSON Schema, appended to
the system prompt. The offline provider looks for the same marker, so both sides share :data:`STRUCTURED_OUTPUT_MARKER`.
The reply side is :func:`parse_structured`. Repairing an invalid reply (asking the model again with the error) is
the caller's loop, not this module's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final

from orchestrator.definition.jsonschemas import SchemaError, check_schema, schema_errors
from orchestrator.errors import NonRetryableStepError

__all__ = ["STRUCTURED_OUTPUT_MARKER", "parse_structured", "structured_output_instruction"]

STRUCTURED_OUTPUT_MARKER: Final = "Respond only with JSON matching this JSON Schema:"
"""The line that introduces the schema; everything after it in the system prompt is the schema's JSON."""

_FENCED_BLOCK: Final = re.compile(r"```(?:json)?[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
_MAX_REPORTED_ERRORS: Final = 5


def structured_output_instruction(schema: Mapping[str, Any]) -> str:
    """Build the system-prompt text that asks for JSON matching ``schema``.

    Append it to a step's own system prompt (after a blank line); it must come last, since everything after the
    marker is read as the schema.

    Args:
        schema: A JSON Schema (Draft 2020-12).

    Returns:
        The marker line, a newline, and the schema as JSON with sorted keys.
    """
    return f"{STRUCTURED_OUTPUT_MARKER}\n{json.dumps(schema, sort_keys=True, ensure_ascii=False)}"


def parse_structured(text: str, schema: Mapping[str, Any]) -> Any:
    """Extract the JSON document from a model's reply and validate it against ``schema``.

    The document is the first of these that parses as JSON: the whole reply; the first fenced code block
    (```` ```json ```` or a bare ```` ``` ````); the text from the first ``{`` to the last ``}``.

    Args:
        text: The model's reply.
        schema: The JSON Schema (Draft 2020-12) the document must match.

    Returns:
        The parsed, valid document.

    Raises:
        NonRetryableStepError: ``kind="invalid_output"`` when no JSON is found or it does not match the schema
            (the message names each failing location, fit to show the model in a repair prompt);
            ``kind="invalid_schema"`` when ``schema`` itself is not a valid JSON Schema or is refused (a ``$ref``
            outside the schema, a pattern RE2 cannot run: see :mod:`orchestrator.definition.jsonschemas`).
    """
    try:
        check_schema(schema)
        document = _extract_json(text)
        errors = sorted(schema_errors(schema, document, check_formats=True), key=lambda error: error.json_path)
    except SchemaError as exc:
        message = f"the output schema is not a valid JSON Schema: {exc.message}"
        raise NonRetryableStepError(message, kind="invalid_schema") from None
    if errors:
        shown = "; ".join(f"at {error.json_path}: {error.message}" for error in errors[:_MAX_REPORTED_ERRORS])
        more = f" (and {len(errors) - _MAX_REPORTED_ERRORS} more)" if len(errors) > _MAX_REPORTED_ERRORS else ""
        raise NonRetryableStepError(f"output does not match the schema: {shown}{more}", kind="invalid_output")
    return document


def _extract_json(text: str) -> Any:
    for candidate in _candidates(text):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    excerpt = text.strip()[:200]
    raise NonRetryableStepError(f"output is not JSON (no JSON document found in {excerpt!r})", kind="invalid_output")


def _candidates(text: str) -> Iterator[str]:
    yield text
    fenced = _FENCED_BLOCK.search(text)
    if fenced is not None:
        yield fenced.group(1)
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        yield text[start : end + 1]
