"""Task events encoded by orjson: the same JSON as kombu's ``json`` serializer, at a tenth of its cost.

Every step costs its worker three or four Celery task events (``task-received``, ``task-started``,
``task-succeeded`` …), published a window at a time as one ``task.multi`` list. Encoding those lists with the
standard library was about 5% of the ``llm`` worker's CPU in ``scripts/bench_load.py``; orjson encodes the same list
about 15 times faster. :data:`EVENT_SERIALIZER` is registered with kombu under the ``application/json`` content type,
so every receiver (Flower, ``celery events``, an ``EventReceiver`` of any app) decodes it with its own ``json``
decoder, and Celery's ``event_serializer`` names it (:func:`orchestrator.celery_app.celery_config`). Task messages and
replies keep kombu's ``json``.

An event orjson cannot encode as kombu would (bytes, a ``datetime``, a dataclass, a subclass of a built-in type, an
integer past 64 bits, a key that is not a string) is encoded by kombu's ``json`` instead, tags and all. Two
differences remain, neither in Celery's events (strings, finite numbers, ``None`` and lists of them): a ``uuid.UUID``
becomes its string rather than kombu's tagged object, and a NaN or infinity becomes ``null`` (strict JSON) rather than
``NaN``.
"""

from __future__ import annotations

from typing import Any

import orjson
from kombu.serialization import registry  # type: ignore[attr-defined]  # not in kombu's type stubs
from kombu.utils.json import dumps as kombu_dumps

from orchestrator.infra.json_text import AS_STDLIB

EVENT_SERIALIZER = "orjson"
"""The serializer's name in kombu's registry, Celery's ``event_serializer``."""

CONTENT_TYPE = "application/json"


def dumps(data: Any) -> bytes | str:
    """``data`` as JSON: orjson's bytes, or kombu's ``json`` text where orjson would differ or cannot."""
    try:
        return orjson.dumps(data, option=AS_STDLIB)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return kombu_dumps(data)


def register() -> None:
    """Register :data:`EVENT_SERIALIZER` with kombu (encoding only: decoding stays kombu's ``json``)."""
    if EVENT_SERIALIZER in registry.name_to_type:
        return
    decode_as = registry.type_to_name.get(CONTENT_TYPE)
    registry.register(EVENT_SERIALIZER, dumps, None, CONTENT_TYPE, "utf-8")
    if decode_as is not None:
        # kombu answers a request in the serializer its content type maps to (``kombu.common.send_reply``): that
        # stays ``json``.
        registry.type_to_name[CONTENT_TYPE] = decode_as
