"""Compact JSON text of what the engine stores for a step (its output, its error, an LLM reply), encoded by orjson.

A step's output is encoded twice on its way to Redis (its size checked, then written) and an LLM step's reply once
more for the reply cache: with the standard library, which escapes every character of a long text one at a time,
that was about 2% of the ``llm`` worker's CPU per step in ``scripts/bench_load.py``; orjson encodes the same value
some 40 times faster. The text reads back the same with any JSON decoder. It differs from
``json.dumps(value, separators=(",", ":"))`` only in spelling: characters beyond ASCII are written as UTF-8 rather
than ``\\u`` escapes (so a size is counted in the bytes Redis stores), and a float's exponent as ``1e-07`` → ``1e-7``,
and in one value: a NaN or an infinity is written ``null``, as strict JSON (and every browser) needs, where the
standard library writes ``NaN``, which no strict decoder reads.

What orjson cannot encode as the standard library would (an integer past 64 bits, a key that is not a string, a
subclass of a built-in type, a ``datetime`` or a dataclass, which the standard library refuses) goes to the standard
library, which encodes it or raises its own ``TypeError`` as before. orjson also writes a ``uuid.UUID`` (its string)
and an ``enum.Enum`` member (its value), which the standard library refuses. Digests and keys (a step's result key, an
LLM request's digest) stay with the standard library: their bytes must not change between versions.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["AS_STDLIB", "compact"]

AS_STDLIB = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS
"""orjson's options that pass to ``default`` the types it would encode where the standard library (and kombu's
``json``) refuses or differs; given no ``default``, orjson refuses them and the caller's fallback decides."""


def compact(value: Any) -> str:
    """``value`` as compact JSON text (no spaces).

    Raises:
        TypeError: ``value`` holds something JSON cannot say (the standard library's message).
        ValueError: ``value`` refers to itself (the standard library's message).
    """
    try:
        return orjson.dumps(value, option=AS_STDLIB).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError: unsupported, too deep or circular
        return json.dumps(value, separators=(",", ":"))
