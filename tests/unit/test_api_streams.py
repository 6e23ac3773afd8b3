"""SSE framing, where a reconnecting client resumes, and a client queue's drop rule. No services needed."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import HTTPException

from orchestrator.api.sse import sse_frame, start_after
from orchestrator.api.streams import Subscription, ends_run
from orchestrator.engine.events import Event

pytestmark = pytest.mark.timeout(30)


def event(seq: int, kind: str = "step_started", step: str | None = "draft") -> Event:
    return Event(run_id="r1", seq=seq, type=kind, step=step, attempt=1, ts=0.0, data={"note": "a\nb"})


def test_an_event_is_framed_with_its_seq_as_id_its_type_as_event_and_its_json_as_one_data_line() -> None:
    frame = sse_frame(event(7)).encode().decode()

    lines = frame.split("\n")
    assert lines[:2] == ["id: 7", "event: step_started"]
    assert lines[2].startswith("data: ")
    assert json.loads(lines[2].removeprefix("data: ")) == event(7).to_json()
    assert lines[3:] == ["", ""], "one blank line ends the frame; the newline in the data stays escaped"


@pytest.mark.parametrize(
    ("after", "last_event_id", "start"),
    [(None, None, 0), (5, None, 5), (None, "9", 9), (5, "9", 9), (5, " 12 ", 12), (3, "", 3)],
)
def test_last_event_id_wins_over_after_because_browsers_send_it_on_reconnect(
    after: int | None, last_event_id: str | None, start: int
) -> None:
    assert start_after(after, last_event_id) == start


@pytest.mark.parametrize("bad", ["seven", "-1", "1.5", "0x10"])
def test_a_last_event_id_that_is_not_a_seq_is_a_422_naming_the_header(bad: str) -> None:
    with pytest.raises(HTTPException) as error:
        start_after(None, bad)

    assert error.value.status_code == 422
    assert "Last-Event-ID" in str(error.value.detail)


def test_only_the_run_ending_events_end_a_stream() -> None:
    ending = {"run_succeeded", "run_failed", "run_cancelled", "run_timed_out"}
    kinds = ["run_started", "run_resumed", "step_succeeded", "step_failed", "approval_decided", *ending]

    assert {k for k in kinds if ends_run(event(1, k, None))} == ending


def test_a_subscription_hands_out_events_in_order_then_none_once_closed() -> None:
    async def scenario() -> list[int | None]:
        subscription = Subscription(limit=10, position=0)
        for seq in (1, 2, 3):
            subscription.on_event(event(seq))
        subscription.close()
        subscription.on_event(event(4))
        return [e.seq if e else None for e in [await subscription.next() for _ in range(4)]]

    assert asyncio.run(scenario()) == [1, 2, 3, None]


def test_a_subscription_that_overflows_is_dropped_at_once_instead_of_growing() -> None:
    async def scenario() -> tuple[bool, int, Event | None]:
        subscription = Subscription(limit=3, position=0)
        for seq in range(1, 6):
            subscription.on_event(event(seq))
        return subscription.dropped, subscription.pending, await subscription.next()

    dropped, pending, first = asyncio.run(scenario())

    assert dropped
    assert pending == 0
    assert first is None, "a dropped client stops at once; it reconnects and replays what it missed"


def test_a_waiting_consumer_wakes_for_the_next_event() -> None:
    async def scenario() -> int | None:
        subscription = Subscription(limit=3, position=0)
        waiter = asyncio.ensure_future(subscription.next())
        await asyncio.sleep(0)
        subscription.on_event(event(42))
        got = await asyncio.wait_for(waiter, timeout=5)
        return got.seq if got else None

    assert asyncio.run(scenario()) == 42
