"""Compact JSON of stored outputs, errors and replies (``orchestrator/infra/json_text.py``): orjson's text where it
says what the standard library says, the standard library's wherever orjson would say something else."""

from __future__ import annotations

import datetime
import enum
import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from orchestrator.infra.json_text import compact


class Colour(enum.Enum):
    RED = "red"


@dataclass
class Point:
    x: int


def test_the_text_is_compact_utf_8_and_reads_back_as_the_value() -> None:
    value: dict[str, Any] = {"text": 'Grüße,世界\n\t"q"\u2028', "n": [1, -2.5, 1e-7, None, True], "nested": {"k": {}}}

    text = compact(value)

    assert json.loads(text) == value
    assert " " not in text
    assert "Grüße,世界" in text  # UTF-8, not \\u escapes: a size counts what Redis stores
    assert len(text.encode()) < len(json.dumps(value, separators=(",", ":")).encode())


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"n": 2**70}, '{"n":1180591620717411303424}'),  # past 64 bits: exact, not a float
        ({1: "a", None: "b"}, '{"1":"a","null":"b"}'),  # keys that are not strings: as the standard library names them
        ([True, 3], "[true,3]"),
    ],
)
def test_what_orjson_would_refuse_or_spell_otherwise_is_the_standard_librarys_text(value: Any, expected: str) -> None:
    assert compact(value) == expected == json.dumps(value, separators=(",", ":"))


def test_a_subclass_of_a_built_in_type_is_encoded_as_the_standard_library_encodes_it() -> None:
    class Score(float):
        def __repr__(self) -> str:
            return "Score!"

    assert compact({"s": Score(0.5)}) == json.dumps({"s": Score(0.5)}, separators=(",", ":"))


@pytest.mark.parametrize("value", [datetime.datetime(2026, 12, 4), Point(1), {1, 2}, b"bytes", object()])
def test_what_json_cannot_say_is_refused_with_the_standard_librarys_type_error(value: Any) -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        compact({"v": value})


def test_a_value_holding_itself_is_refused_with_a_value_error() -> None:
    loop: list[Any] = []
    loop.append(loop)

    with pytest.raises(ValueError, match="Circular reference"):
        compact(loop)


def test_nan_and_infinity_become_null_and_a_uuid_and_an_enum_their_values() -> None:
    an_id = uuid.UUID("12345678-1234-5678-1234-567812345678")

    text = compact([math.nan, math.inf, -math.inf, an_id, Colour.RED])

    assert text == '[null,null,null,"12345678-1234-5678-1234-567812345678","red"]'
