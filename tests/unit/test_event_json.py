"""Task events encoded by orjson (``orchestrator/infra/event_json.py``): what any JSON receiver decodes is what kombu's
``json`` would have sent."""

from __future__ import annotations

import datetime
from decimal import Decimal
from typing import Any

from kombu import Connection
from kombu.serialization import dumps, loads, registry

from orchestrator.celery_app import celery_config, create_app
from orchestrator.infra import event_json
from orchestrator.infra.settings import Settings

ACCEPT = {"application/json"}


def task_events() -> list[dict[str, Any]]:
    """A ``task.multi`` window as Celery's dispatcher builds it: a step's events, with Celery's own fields."""
    base = {"hostname": "llm1@test", "utcoffset": 0, "pid": 4242, "clock": 17, "timestamp": 1764780000.123456}
    return [
        {
            **base,
            "type": "task-received",
            "uuid": "t-1",
            "name": "pipeline.draft",
            "args": "('run', 'h', 'draft', '1')",
            "kwargs": "{}",
            "root_id": "t-1",
            "parent_id": None,
            "retries": 0,
            "eta": None,
            "expires": None,
            "local_received": 1764780000.1,
        },
        {**base, "type": "task-started", "uuid": "t-1"},
        {**base, "type": "task-succeeded", "uuid": "t-1", "result": "'succeeded'", "runtime": 1.0234},
        {**base, "type": "worker-heartbeat", "loadavg": [0.5, 0.25, 0.0], "active": 3, "freq": 2.0, "sw_sys": "Linux"},
        {**base, "type": "task-failed", "uuid": "t-2", "exception": "StepFailed('é \\u2028 \u00ab')", "traceback": ""},
    ]


def test_the_events_decode_as_json_to_what_kombus_json_serializer_sends() -> None:
    event_json.register()
    events = task_events()

    content_type, encoding, body = dumps(events, serializer=event_json.EVENT_SERIALIZER)

    assert (content_type, encoding) == ("application/json", "utf-8")
    assert isinstance(body, bytes), "encoded by orjson"
    _, _, kombu_body = dumps(events, serializer="json")
    expected = loads(kombu_body, "application/json", "utf-8", accept=ACCEPT)
    assert loads(body, content_type, encoding, accept=ACCEPT) == expected == events


def test_what_orjson_would_encode_otherwise_is_encoded_by_kombu_with_its_type_tags() -> None:
    event_json.register()
    when = datetime.datetime(2026, 12, 3, 17, 0)
    value = {"when": when, "raw": b"\x00bytes", "amount": Decimal("1.10"), "big": 2**70}

    _, _, body = dumps(value, serializer=event_json.EVENT_SERIALIZER)

    assert body == dumps(value, serializer="json")[2]
    decoded = loads(body, "application/json", "utf-8", accept=ACCEPT)
    assert decoded["when"] == when
    assert decoded["big"] == 2**70


def test_replies_keep_kombus_json_and_registering_twice_changes_nothing() -> None:
    event_json.register()
    encoder = registry._encoders[event_json.EVENT_SERIALIZER]

    event_json.register()

    assert registry._encoders[event_json.EVENT_SERIALIZER] is encoder
    # kombu.common.send_reply answers a request in the serializer its content type names.
    assert registry.type_to_name["application/json"] == "json"


def test_an_apps_dispatcher_sends_with_it_and_its_receiver_decodes_the_events() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:6379/0")
    assert celery_config(settings)["event_serializer"] == event_json.EVENT_SERIALIZER
    app = create_app(settings)
    received: list[dict[str, Any]] = []
    with Connection("memory://") as connection:
        receiver = app.events.Receiver(connection, handlers={"*": received.append})
        dispatcher = app.events.Dispatcher(connection, hostname="llm1@test", buffer_group=["task"])
        assert dispatcher.serializer == event_json.EVENT_SERIALIZER
        with receiver.consumer_context() as (conn, _, _):
            dispatcher.send("task-started", uuid="t-1")
            dispatcher.send("task-succeeded", uuid="t-1", result="'succeeded'", runtime=1.5)
            dispatcher.flush()
            conn.drain_events(timeout=5)

    assert [(event["type"], event["uuid"]) for event in received] == [
        ("task-started", "t-1"),
        ("task-succeeded", "t-1"),
    ]
    assert received[1]["runtime"] == 1.5
    assert received[1]["hostname"] == "llm1@test"
