"""The watch view folds a run's events into rows: tested without a terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from orchestrator.engine.deltas import Delta
from orchestrator.engine.events import Event
from orchestrator.watch import WatchView


def _event(seq: int, kind: str, step: str | None = None, attempt: int = 0, ts: float = 0.0, **data: Any) -> Event:
    return Event("r1", seq, kind, step, attempt, ts, data)


def _view() -> WatchView:
    return WatchView.from_status({"run_id": "r1", "workflow": "w", "version": 1, "steps": {"a": {}, "b": {}}})


def test_a_retried_then_successful_step_shows_its_attempt_and_duration() -> None:
    view = _view()
    for event in [
        _event(1, "run_started"),
        _event(2, "step_queued", "a"),
        _event(3, "step_started", "a", 1, ts=10.0),
        _event(4, "step_retry", "a", 1, error={"type": "rate_limit"}, countdown_s=2.0),
        _event(5, "step_started", "a", 2, ts=13.0),
        _event(6, "step_succeeded", "a", 2, ts=13.5),
    ]:
        view.apply(event)

    row = view.steps["a"]
    assert (row.status, row.attempt, row.finished) == ("succeeded", 2, 13.5)
    assert view.done == 1
    assert view.last_seq == 6
    text = _render(view)
    assert "0.50s" in text
    assert "succeeded" in text


def test_the_run_status_follows_run_events_and_a_resume_reopens_it() -> None:
    view = _view()
    view.apply(_event(1, "run_started"))
    view.apply(_event(2, "step_failed", "a", 1, message="boom"))
    view.apply(_event(3, "run_failed"))
    assert view.status == "failed"
    assert view.steps["a"].note == "boom"

    view.apply(_event(4, "run_resumed", generation=2))
    assert view.status == "running"


def test_a_lost_worker_and_a_reused_result_are_explained() -> None:
    view = _view()
    view.apply(_event(1, "step_lost", "a", type="worker_lost"))
    assert view.steps["a"].note == "worker lost: re-dispatched"
    view.apply(_event(2, "step_succeeded", "b", 1, cached=True))
    assert view.steps["b"].note == "reused stored result"


def _render(view: WatchView) -> str:
    console = Console(width=160, record=True)
    console.print(view)
    return console.export_text()


def test_a_finished_llm_step_shows_its_cost_and_tokens_and_the_run_its_totals_and_budget_left() -> None:
    view = _view()
    view.clock = lambda: 1_700_000_010.0
    view.apply(_event(1, "step_started", "a", 1, ts=1_700_000_000.0))
    running = _render(view)
    view.apply(
        _event(
            2,
            "step_succeeded",
            "a",
            1,
            ts=1_700_000_001.5,
            usage={"input_tokens": 120, "output_tokens": 45},
            cost_usd=0.00123,
        )
    )
    view.refresh(
        {
            "started_at": "2023-11-14T22:13:20.000000+00:00",
            "finished_at": None,
            "cost": 0.0025,
            "llm_calls": 2,
            "usage": {"input_tokens": 240, "output_tokens": 90},
            "budget": {"budget_usd": 0.5, "held_usd": 0.0, "exhausted": False},
        }
    )

    text = _render(view)

    assert "10.00s…" in running, "a running step's duration so far"
    assert "$0.0012" in text
    assert "120 in / 45 out" in text
    assert "cost $0.0025 over 2 paid LLM calls" in text
    assert "tokens 240 in / 90 out" in text
    assert "budget left $0.4975 of $0.5000" in text
    assert "duration 10.00s so far" in text


def test_a_map_step_row_shows_its_items_done_of_total() -> None:
    view = WatchView.from_status({"run_id": "r1", "workflow": "w", "version": 1, "steps": {"m": {}}})
    view.apply(_event(1, "step_started", "m", 1))
    counts = {"pending": 6, "queued": 1, "running": 1, "succeeded": 2, "failed": 0, "skipped": 0, "cancelled": 0}
    view.refresh({"steps": {"m": {"items": {"total": 10, **counts}}}})
    view.apply(_event(2, "item_succeeded", "m", 1, index=4))

    assert view.steps["m"].note == "3 of 10 items"
    assert view.steps["m"].status == "running"


def test_an_agent_steps_conversation_grows_with_its_turns_tool_calls_and_streamed_text() -> None:
    view = _view()
    view.apply(_event(1, "step_started", "a", 1, ts=10.0))
    view.apply(
        _event(
            2,
            "agent_turn",
            "a",
            1,
            turn=1,
            text="Let me compute.",
            calls=[
                {"id": "t1", "name": "calculator", "input": '{"expression":"6*7"}'},
            ],
        )
    )
    assert view.steps["a"].status == "running", "a turn is no change of the step's status"
    first = _render(view)
    assert "turn 1: Let me compute." in first
    assert '→ calculator {"expression":"6*7"}' in first
    assert "← calculator" not in first

    view.apply(_event(3, "tool_call", "a", 1, turn=1, id="t1", name="calculator", error=False, result='{"result":42}'))
    view.apply_delta(Delta("llm_reset", "a", None, 1))
    view.apply_delta(Delta("llm_delta", "a", None, 1, "The answer is", 0))
    second = _render(view)
    assert '← calculator: {"result":42}' in second
    assert "… The answer is" in second, "the turn being written shows under the conversation"

    view.apply(_event(4, "agent_turn", "a", 1, turn=2, text="The answer is 42.", calls=[]))
    view.apply(_event(5, "step_succeeded", "a", 1, ts=12.0))
    last = _render(view)
    assert "turn 2: The answer is 42." in last
    assert "… The answer is" not in last, "a finished turn's text is shown once, in its line"
    assert view.steps["a"].status == "succeeded"


def test_a_failed_tool_call_is_marked_and_long_values_are_cut_to_a_line() -> None:
    view = _view()
    view.apply(_event(1, "agent_turn", "b", 1, turn=1, text="x" * 500, calls=[]))
    view.apply(_event(2, "tool_call", "b", 1, turn=1, id="t", name="lookup", error=True, result="boom"))
    lines = view.talk["b"]
    assert lines[-1] == "  ✗ lookup: boom"
    assert len(lines[0]) == 160
    assert lines[0].endswith("…")
