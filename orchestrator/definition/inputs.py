"""Run inputs: validated against the workflow's input schema before anything is written."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from jsonschema import ValidationError

from orchestrator.definition.jsonschemas import SchemaError, schema_errors
from orchestrator.definition.spec import WorkflowSpec
from orchestrator.errors import InputValidationError

_MAX_SHOWN = 80
"""An unknown key longer than this is cut in the message and not compared with the declared ones."""


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
    _refuse_unknown(spec, inputs)
    filled = {key: schema["default"] for key, schema in spec.inputs.items() if "default" in schema}
    filled.update(inputs)
    first = _first_error(spec, filled)
    if first is not None:
        where, error = first
        raise InputValidationError(f"input {where!r}: {error.message}" if where else f"inputs: {error.message}")
    return filled


def _refuse_unknown(spec: WorkflowSpec, inputs: Mapping[str, Any]) -> None:
    """Refuse an input the workflow does not declare, before a missing one is reported: a misspelled key is both,
    and only its name says which it was.

    Raises:
        InputValidationError: Naming the first unknown key (by name), the declared key it is closest to, and the
            declared ones.
    """
    unknown = sorted(str(key) for key in inputs if key not in spec.inputs)
    if not unknown:
        return
    key = unknown[0]
    shown = key if len(key) <= _MAX_SHOWN else key[:_MAX_SHOWN] + "…"
    close = difflib.get_close_matches(key, spec.inputs, n=1) if len(key) <= _MAX_SHOWN else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    more = f" ({len(unknown) - 1} more unknown)" if len(unknown) > 1 else ""
    declared = ", ".join(sorted(spec.inputs)) or "no inputs"
    raise InputValidationError(
        f"input {shown!r} is not an input of workflow {spec.name!r}{hint}{more} (the workflow declares: {declared})"
    )


def _first_error(spec: WorkflowSpec, filled: Mapping[str, Any]) -> tuple[str, ValidationError] | None:
    """The first error with its dotted path: of the inputs as a whole, else of the first input (by name) with one.

    Each input's schema is a document of its own (its ``#/$defs/...`` refer to itself), so each is validated alone.

    Raises:
        InputValidationError: When a schema fails while validating (a reference into data, reached only then).
    """
    envelope = {**input_schema(spec), "properties": dict.fromkeys(spec.inputs, True)}
    try:
        errors: list[tuple[list[str], ValidationError]] = [([], error) for error in schema_errors(envelope, filled)]
        for key in sorted(key for key in filled if key in spec.inputs):
            if errors:
                break
            errors = [([key], error) for error in schema_errors(spec.inputs[key], filled[key])]
    except SchemaError as exc:
        raise InputValidationError(f"inputs: the workflow's input schema fails: {exc.message}") from None
    paths = [(".".join(str(part) for part in [*prefix, *error.absolute_path]), error) for prefix, error in errors]
    return min(paths, key=lambda pair: pair[0], default=None)


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
