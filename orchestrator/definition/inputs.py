"""Run inputs: validated against the workflow's input schema before anything is written."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from jsonschema import Draft202012Validator

from orchestrator.definition.spec import WorkflowSpec
from orchestrator.errors import InputValidationError


def input_schema(spec: WorkflowSpec) -> dict[str, Any]:
    """The JSON Schema of a workflow's inputs: each declared input is required unless it has a ``default``."""
    return {
        "type": "object",
        "properties": spec.inputs,
        "required": [key for key, schema in spec.inputs.items() if "default" not in schema],
        "additionalProperties": False,
    }


def validate_inputs(spec: WorkflowSpec, inputs: Mapping[str, Any], *, max_bytes: int) -> dict[str, Any]:
    """Check inputs against the workflow's schema and fill in defaults.

    Returns:
        The inputs with defaults applied.

    Raises:
        InputValidationError: Naming the first offending input, or the size when too large.
    """
    try:
        size = len(json.dumps(inputs, separators=(",", ":")).encode())
    except (TypeError, ValueError) as exc:
        raise InputValidationError(f"inputs are not JSON-serialisable: {exc}") from None
    except RecursionError:
        raise InputValidationError("inputs are nested too deeply") from None
    if size > max_bytes:
        raise InputValidationError(f"inputs are {size} bytes; the limit is {max_bytes}")
    filled = {key: schema["default"] for key, schema in spec.inputs.items() if "default" in schema}
    filled.update(inputs)
    errors = sorted(Draft202012Validator(input_schema(spec)).iter_errors(filled), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.absolute_path)
        message = first.message
        if first.validator == "additionalProperties":
            message = f"{message} (the workflow declares: {', '.join(sorted(spec.inputs)) or 'no inputs'})"
        raise InputValidationError(f"input {where!r}: {message}" if where else f"inputs: {message}")
    return filled


def parse_cli_inputs(spec: WorkflowSpec, pairs: Iterable[str]) -> dict[str, Any]:
    """Turn ``KEY=VALUE`` strings into inputs, reading VALUE as JSON where the schema wants a non-string.

    Raises:
        InputValidationError: For a pair without ``=`` or a value that does not parse.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise InputValidationError(f"--input {pair!r}: expected KEY=VALUE")
        wanted = spec.inputs.get(key, {}).get("type", "string")
        if wanted == "string" or (isinstance(wanted, list) and "string" in wanted):
            out[key] = raw
            continue
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            raise InputValidationError(f"--input {key}: {raw!r} is not a valid {wanted}") from None
    return out
