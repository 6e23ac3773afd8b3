"""JSON Schemas that users hand us (workflow inputs, an ``llm`` step's ``output_schema``): checked, then validated.

A submitted schema is hostile until checked, so every schema goes through this module and nothing else builds a
validator:

- **It never reaches outside the document.** ``$ref`` and ``$dynamicRef`` must be local (``#/$defs/x``, ``#anchor``)
  and resolve; validators resolve through a :class:`referencing.Registry` whose ``retrieve`` refuses, so not even a
  ``$ref`` this check missed can fetch a URL or read a file (jsonschema's default, deprecated, resolver does both).
  An ``$id`` only renames a resource of the document itself, so it cannot point anywhere retrievable.
- **Its regular expressions run in linear time.** ``pattern`` and ``patternProperties`` (and ``additionalProperties``,
  which consults them) match with RE2, which cannot backtrack: Python's ``re`` can take exponential time on
  ``^(a+)+$`` and holds the GIL meanwhile, freezing every thread of the process. A pattern RE2 cannot compile
  (backreferences, lookaround) is refused. ``unevaluatedProperties`` beside ``patternProperties`` is refused because
  jsonschema evaluates that pair with Python's ``re`` internally.
- **Its work is bounded.** ``uniqueItems`` is linear (jsonschema compares objects pairwise: 4,000 of them took a
  minute), and one validation may evaluate at most :data:`MAX_VALIDATION_STEPS` keywords: ``allOf`` over ``$ref`` s
  nests into exponential work in a schema of a few lines (18 levels of two refs: 15 s).

The format checks jsonschema applies (``date``, ``email``, ``ipv4``, ``uuid``, ``regex`` …) match fixed, linear
patterns or only compile the instance; none runs a submitted pattern.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, Final

import re2
import referencing.exceptions
from jsonschema import Draft202012Validator, ValidationError
from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator
from jsonschema.validators import extend
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

__all__ = ["MAX_VALIDATION_STEPS", "SchemaError", "check_schema", "schema_errors"]

MAX_VALIDATION_STEPS: Final = 300_000
"""The most keyword evaluations one validation may take (some 2-5 s at worst): 256 KB of inputs, the most a run
takes, need far fewer even against a detailed schema."""
_CACHED_SCHEMAS: Final = 512
_MAX_CACHED_SCHEMA_CHARS: Final = 64 * 1024
"""Checked schemas and their validators are kept (``_CACHED_SCHEMAS`` of each) only up to this size of canonical
JSON; a larger one is checked on every use, so a stream of distinct multi-megabyte schemas cannot pin memory."""
_REF_KEYWORDS: Final = ("$ref", "$dynamicRef", "$recursiveRef")
_RE2_OPTIONS: Final = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is reported to the user; RE2 would also print it to stderr


def check_schema(schema: Mapping[str, Any]) -> None:
    """Check that ``schema`` is a valid Draft 2020-12 schema this module can validate safely.

    Args:
        schema: The schema, as parsed from JSON or YAML.

    Raises:
        SchemaError: With one line naming the offending keyword and value: not a valid schema, a ``$ref`` that is
            not local or does not resolve, a pattern RE2 cannot compile.
    """
    _checked(_canonical(schema))


def schema_errors(schema: Mapping[str, Any], instance: Any, *, check_formats: bool = False) -> list[ValidationError]:
    """Validate ``instance`` against ``schema`` (checked first, once per process and schema).

    Args:
        schema: The schema.
        instance: The document to validate.
        check_formats: Whether ``format`` is an assertion (jsonschema's format checker) rather than an annotation.

    Returns:
        Every validation error, in jsonschema's order; empty when ``instance`` is valid.

    Raises:
        SchemaError: When the schema is refused (see :func:`check_schema`) or a reference fails during validation.
    """
    validator = _validator(_canonical(schema), check_formats)
    budget = _steps_left.set([MAX_VALIDATION_STEPS])
    try:
        return list(validator.iter_errors(instance))
    except referencing.exceptions.Unresolvable as exc:  # a $ref into data only reached at validation time
        raise SchemaError(f"a reference in the schema does not resolve: {exc}") from None
    except _OverBudgetError:
        message = f"validating this value takes more than {MAX_VALIDATION_STEPS} steps (allOf/anyOf over $refs?)"
        raise SchemaError(message) from None
    except RecursionError:
        raise SchemaError("the schema applies itself without end, or the value is nested too deeply") from None
    finally:
        _steps_left.reset(budget)


def _canonical(schema: Mapping[str, Any]) -> str:
    try:
        return json.dumps(schema, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"the schema is not JSON: {exc}") from None
    except RecursionError:
        raise SchemaError("the schema is nested too deeply") from None


def _checked(schema_json: str) -> Any:
    """The schema of a canonical JSON, checked: a few milliseconds, so once per process for a schema of common size."""
    if len(schema_json) > _MAX_CACHED_SCHEMA_CHARS:
        return _check(schema_json)
    return _check_cached(schema_json)


def _validator(schema_json: str, check_formats: bool) -> Validator:
    if len(schema_json) > _MAX_CACHED_SCHEMA_CHARS:
        return _build(schema_json, check_formats)
    return _build_cached(schema_json, check_formats)


def _check(schema_json: str) -> Any:
    schema = json.loads(schema_json)
    Draft202012Validator.check_schema(schema)
    _check_references_and_patterns(schema)
    _check_local_references_resolve(schema)
    return schema


def _build(schema_json: str, check_formats: bool) -> Validator:
    format_checker = Draft202012Validator.FORMAT_CHECKER if check_formats else None
    return _LinearValidator(_checked(schema_json), registry=_NO_RETRIEVAL, format_checker=format_checker)


_check_cached = functools.lru_cache(maxsize=_CACHED_SCHEMAS)(_check)
_build_cached = functools.lru_cache(maxsize=_CACHED_SCHEMAS)(_build)


def _check_references_and_patterns(schema: Any) -> None:
    # Every mapping in the document counts, even under `const` or `default`: a local $ref may point there and use
    # it as a schema.
    pattern_properties = unevaluated_properties = False
    for node in _mappings(schema):
        for keyword in _REF_KEYWORDS:
            ref = node.get(keyword)
            if isinstance(ref, str) and not ref.startswith("#"):
                raise SchemaError(f"{keyword} {ref!r} points outside the schema (only local references, #...)")
        if isinstance(node.get("pattern"), str):
            _compiled(node["pattern"])
        if isinstance(node.get("patternProperties"), dict):
            pattern_properties = True
            for pattern in node["patternProperties"]:
                _compiled(pattern)
        unevaluated_properties = unevaluated_properties or "unevaluatedProperties" in node
    if pattern_properties and unevaluated_properties:
        raise SchemaError("a schema with patternProperties cannot use unevaluatedProperties (use additionalProperties)")


def _check_local_references_resolve(schema: Any) -> None:
    root = DRAFT202012.create_resource(schema)
    stack = [(root, _NO_RETRIEVAL.resolver_with_root(root))]
    while stack:
        resource, resolver = stack.pop()
        resolver = resolver.in_subresource(resource)  # an $id moves the base its fragments resolve against
        if isinstance(resource.contents, dict):
            for keyword in _REF_KEYWORDS:
                ref = resource.contents.get(keyword)
                if isinstance(ref, str):
                    try:
                        resolver.lookup(ref)
                    except referencing.exceptions.Unresolvable:
                        raise SchemaError(f"{keyword} {ref!r} does not resolve within the schema") from None
        stack.extend((subresource, resolver) for subresource in resource.subresources())


def _mappings(document: Any) -> Iterator[dict[str, Any]]:
    stack = [document]  # iterative: a schema may be nested deeper than the recursion limit
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re2._Regexp:
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        message = f"pattern {pattern!r} is not supported ({reason}): patterns may not use backreferences or lookaround"
        raise SchemaError(message) from None


def _refuse_retrieval(uri: str) -> Resource[Any]:
    raise referencing.exceptions.NoSuchResource(ref=uri)  # type: ignore[call-arg]


_NO_RETRIEVAL: Final[Registry[Any]] = Registry(retrieve=_refuse_retrieval)  # type: ignore[call-arg]


_Keyword = Callable[[Any, Any, Any, Any], Iterator[ValidationError] | None]
_steps_left: ContextVar[list[int]] = ContextVar("_steps_left")


class _OverBudgetError(Exception):
    """A validation took more than ``MAX_VALIDATION_STEPS`` keyword evaluations."""


def _counted(keyword: _Keyword) -> _Keyword:
    def evaluate(validator: Any, value: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
        left = _steps_left.get(None)
        if left is not None:
            left[0] -= 1
            if left[0] < 0:
                raise _OverBudgetError
        yield from keyword(validator, value, instance, schema) or ()

    return evaluate


def _equality_key(value: Any) -> Hashable:
    """A key equal for values JSON Schema calls equal: ``1`` and ``1.0`` are, ``1`` and ``true`` are not."""
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, list | tuple):
        return ("array", tuple(_equality_key(item) for item in value))
    if isinstance(value, dict):
        return ("object", frozenset((key, _equality_key(item)) for key, item in value.items()))
    return ("other", id(value))  # not JSON: equal only to itself


# jsonschema's keyword functions have this signature; the instance is whatever was submitted.
def _pattern(
    validator: Draft202012Validator, pattern: str, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _compiled(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(
    validator: Draft202012Validator, patterns: Mapping[str, Any], instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _compiled(pattern).search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(
    validator: Draft202012Validator, additional: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = [_compiled(pattern) for pattern in schema.get("patternProperties", {})]
    extras = sorted(
        (key for key in instance if key not in properties and not any(p.search(key) for p in patterns)), key=str
    )
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        names = ", ".join(repr(extra) for extra in extras)
        if patterns:
            regexes = ", ".join(repr(pattern) for pattern in sorted(schema["patternProperties"]))
            verb = "does" if len(extras) == 1 else "do"
            yield ValidationError(f"{names} {verb} not match any of the regexes: {regexes}")
        else:
            verb = "was" if len(extras) == 1 else "were"
            yield ValidationError(f"Additional properties are not allowed ({names} {verb} unexpected)")


def _unique_items(
    validator: Draft202012Validator, unique: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if unique and validator.is_type(instance, "array"):
        keys = [_equality_key(item) for item in instance]
        if len(set(keys)) < len(keys):
            yield ValidationError(f"{instance!r} has non-unique elements")


_KEYWORDS: Final[dict[str, _Keyword]] = {
    **Draft202012Validator.VALIDATORS,
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "uniqueItems": _unique_items,
}
_LinearValidator: Final[type[Validator]] = extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, validators={name: _counted(keyword) for name, keyword in _KEYWORDS.items()}
)
