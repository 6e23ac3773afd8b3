"""What the offline provider writes: prose of a realistic length, and JSON that fits a requested schema.

Deterministic for a given random generator: the offline provider seeds it from the request, so the same request
always gets the same reply.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from orchestrator.llm.structured import STRUCTURED_OUTPUT_MARKER

VOCABULARY: Final = tuple(
    """
    analysis approach argument audience balance careful change clear company context customer data decision
    design detail development evidence example experience factor feature focus framework goal growth idea impact
    insight issue key language market measure method model need note option outcome pattern people perspective
    plan point practice priority process product progress project quality question reader reason research result
    review risk role scope section signal source strategy strength structure summary support system team theme
    time topic trade trend value view work clearly often also usually carefully directly quickly broadly
    important useful practical strong simple recent common specific new early overall central relevant reliable
    and the of to with for in on by across because while therefore however which this that these each every many
    most some our their its
    """.split()  # noqa: SIM905
)


def prose_tokens(text: str) -> int:
    return math.ceil(len(text.split()) * 1.3)


def compose_prose(rng: random.Random, prompt: str, max_tokens: int) -> str:
    """Sentences of vocabulary words, opening on the prompt's first words quoted, 0.6-0.75 x max_tokens words long."""
    # At most 0.75 words per token keeps ceil(words * 1.3) within max_tokens, as a real reply's would be.
    count = max(1, min(math.floor(rng.uniform(0.6, 0.9) * max_tokens), math.floor(0.75 * max_tokens)))
    topic = prompt.replace('"', "").split()[: min(6, count - 1)]
    words = ["Regarding", f'"{topic[0]}', *topic[1:]] if topic else ["Overall"]
    words[-1] += '",' if topic else ","
    sentence_left, capitalize = rng.randint(6, 14), False
    # rng.choice(VOCABULARY), inlined (the same draws, so the same replies): this loop is most of a reply's CPU.
    size, getrandbits = len(VOCABULARY), rng.getrandbits
    bits = size.bit_length()
    append = words.append
    for _ in range(count - len(words)):
        drawn = getrandbits(bits)
        while drawn >= size:
            drawn = getrandbits(bits)
        word = VOCABULARY[drawn]
        if capitalize:
            word = word.capitalize()
        sentence_left -= 1
        capitalize = sentence_left == 0
        if capitalize:
            word += "."
            sentence_left = rng.randint(6, 14)
        append(word)
    words[-1] = words[-1].rstrip(",.") + "."
    return " ".join(words)


def requested_schema(system: str) -> Any:
    if STRUCTURED_OUTPUT_MARKER not in system:
        return None
    schema_text = system.split(STRUCTURED_OUTPUT_MARKER, 1)[1]
    try:
        return json.loads(schema_text)
    except ValueError:
        return None


def example(schema: Any, root: Any, rng: random.Random, depth: int) -> Any:
    """A deterministic instance of a JSON Schema: all properties, 1-3 array items, first enum value, ``const``,
    the first of ``examples``."""
    if not isinstance(schema, dict) or depth > 16:
        return "value"
    if "$ref" in schema:
        return example(_resolve(schema["$ref"], root), root, rng, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("examples"), list) and schema["examples"]:
        return schema["examples"][0]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for keyword in ("anyOf", "oneOf"):
        options = schema.get(keyword)
        if isinstance(options, list) and options:
            # Optional[X] in pydantic's schemas is anyOf [X, null]: prefer the informative branch.
            chosen = next((option for option in options if _type_of(option) != "null"), options[0])
            return example(chosen, root, rng, depth + 1)
    if isinstance(schema.get("allOf"), list):
        merged = {key: value for key, value in schema.items() if key != "allOf"}
        for part in schema["allOf"]:
            resolved = _resolve(part["$ref"], root) if isinstance(part, dict) and "$ref" in part else part
            merged.update(resolved if isinstance(resolved, dict) else {})
        return example(merged, root, rng, depth + 1)
    kind = _type_of(schema)
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: example(sub, root, rng, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        return _example_array(schema, root, rng, depth)
    if kind == "integer":
        return _example_integer(schema, rng)
    if kind == "number":
        return _example_number(schema, rng)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return _example_string(schema, rng)


def _type_of(schema: Any) -> str:
    if not isinstance(schema, dict):
        return "string"
    declared = schema.get("type")
    if isinstance(declared, list):
        declared = next((name for name in declared if name != "null"), "null")
    if isinstance(declared, str):
        return declared
    if "properties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return "string"


def _resolve(reference: Any, root: Any) -> Any:
    """Follow a local ``#/...`` JSON pointer; anything else resolves to an empty (any-value) schema."""
    if not isinstance(reference, str) or not reference.startswith("#"):
        return {}
    target = root
    for escaped in reference.lstrip("#").split("/")[1:]:
        part = escaped.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            return {}
    return target


def _example_array(schema: dict[str, Any], root: Any, rng: random.Random, depth: int) -> list[Any]:
    prefix = schema.get("prefixItems", [])
    low = max(int(schema.get("minItems", 1)), 1)
    high = max(low, min(int(schema.get("maxItems", 3)), 3))
    count = max(rng.randint(low, high), len(prefix))
    items = [example(prefix[index], root, rng, depth + 1) for index in range(len(prefix))]
    while len(items) < count:
        items.append(example(schema.get("items", {}), root, rng, depth + 1))
    if schema.get("uniqueItems"):
        unique: list[Any] = []
        for item in items:
            if item not in unique:
                unique.append(item)
        items = unique
    return items


def _example_integer(schema: dict[str, Any], rng: random.Random) -> int:
    low = schema.get("minimum", schema["exclusiveMinimum"] + 1 if "exclusiveMinimum" in schema else None)
    high = schema.get("maximum", schema["exclusiveMaximum"] - 1 if "exclusiveMaximum" in schema else None)
    low = math.ceil(low) if low is not None else (math.floor(high) - 100 if high is not None else 0)
    high = math.floor(high) if high is not None else low + 100
    value = rng.randint(low, max(low, high))
    step = schema.get("multipleOf")
    if isinstance(step, int) and step > 0:
        value = math.ceil(low / step) * step
    return value


def _example_number(schema: dict[str, Any], rng: random.Random) -> float:
    low = float(schema.get("minimum", schema.get("exclusiveMinimum", 0.0)))
    high = float(schema.get("maximum", schema.get("exclusiveMaximum", low + 100.0)))
    # Stay strictly inside so exclusive bounds hold too.
    value = low + (high - low) * rng.uniform(0.1, 0.9)
    rounded = round(value, 2)
    return rounded if low < rounded < high else value


_STRING_FORMATS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "date": "2026-01-15",
        "date-time": "2026-01-15T09:30:00Z",
        "time": "09:30:00Z",
        "email": "author@example.com",
        "uri": "https://example.com/offline",
        "hostname": "example.com",
        "ipv4": "192.0.2.1",
        "ipv6": "2001:db8::1",
    }
)


def _example_string(schema: dict[str, Any], rng: random.Random) -> str:
    text_format = schema.get("format")
    if text_format == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if isinstance(text_format, str) and text_format in _STRING_FORMATS:
        return _STRING_FORMATS[text_format]
    text = " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(1, 4)))
    min_length, max_length = int(schema.get("minLength", 0)), schema.get("maxLength")
    while len(text) < min_length:
        text += " " + rng.choice(VOCABULARY)
    if isinstance(max_length, int):
        text = text[:max_length].rstrip() or text[:max_length]
    return text
