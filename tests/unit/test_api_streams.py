"""SSE framing, where a reconnecting client resumes, and a client queue's drop rule. No services needed."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import HTTPException

from orchestrator.api.sse import sse_frame, start_after
from orchestrator.api.streams import Subscription, ends_run
from orchestrator.engine.deltas import Delta
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


def _drain(subscription: Subscription) -> list[Event | Delta]:
    async def scenario() -> list[Event | Delta]:
        taken: list[Event | Delta] = []
        while subscription.pending:
            item = await subscription.next()
            assert item is not None
            taken.append(item)
        return taken

    return asyncio.run(scenario())


def _piece(step: str, offset: int, text: str, attempt: int = 1) -> Delta:
    return Delta("llm_delta", step, None, attempt, text, offset)


def test_a_client_that_falls_behind_gets_its_missed_deltas_as_one_piece_and_is_not_dropped() -> None:
    subscription = Subscription(limit=3, position=0)
    pieces = [f"w{n} " for n in range(5000)]
    offset = 0
    for n, piece in enumerate(pieces):
        subscription.on_delta(_piece("write", offset, piece))
        offset += len(piece)
        if n == 2500:
            subscription.on_event(event(1, "step_started", "other"))

    taken = _drain(subscription)

    assert not subscription.dropped
    assert [type(item).__name__ for item in taken] == ["Delta", "Event"], "one piece, then the event after it"
    first = taken[0]
    assert isinstance(first, Delta)
    assert (first.offset, first.text) == (0, "".join(pieces)), "the text so far since the last delivered position"
    assert subscription.coalesced == 4999


def test_text_taken_by_the_client_is_not_extended_and_a_reset_or_a_gap_starts_a_new_piece() -> None:
    subscription = Subscription(limit=3, position=0)
    subscription.on_delta(_piece("write", 0, "ab"))
    subscription.on_delta(_piece("write", 2, "cd"))
    subscription.on_delta(_piece("other", 0, "x"))
    first = _drain(subscription)
    subscription.on_delta(_piece("write", 4, "ef"))
    subscription.on_delta(Delta("llm_reset", "write", None, 1))
    subscription.on_delta(_piece("write", 0, "gh"))
    subscription.on_delta(_piece("write", 9, "lost before"))  # a gap (pub/sub lost some): never glued on
    subscription.on_delta(_piece("write", 0, "again", attempt=2))

    later = _drain(subscription)

    assert [(d.step, d.text) for d in first if isinstance(d, Delta)] == [("write", "abcd"), ("other", "x")]
    assert [(d.type, d.attempt, d.offset, d.text) for d in later if isinstance(d, Delta)] == [
        ("llm_delta", 1, 4, "ef"),
        ("llm_reset", 1, 0, ""),
        ("llm_delta", 1, 0, "gh"),
        ("llm_delta", 1, 9, "lost before"),
        ("llm_delta", 2, 0, "again"),
    ]


def test_events_past_the_limit_still_drop_a_client_whatever_deltas_it_holds() -> None:
    subscription = Subscription(limit=2, position=0)
    subscription.on_delta(_piece("write", 0, "ab"))
    for seq in (1, 2, 3):
        subscription.on_event(event(seq))

    assert subscription.dropped
    assert subscription.pending == 0
