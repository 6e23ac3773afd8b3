"""An attempt's LLM call is closed in the round trip of the attempt's next write: its finish, or the next call's open.

Against a real Redis (the scripts are Lua): every round trip the worker makes is recorded, to see where the close
script went, and the run's budget fields show that every call was settled exactly once.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from orchestrator.agents.tools import ToolContext, tool
from orchestrator.domain import Attempt, StepOutcome
from orchestrator.engine.runtime import Runtime, build_runtime
from orchestrator.errors import NonRetryableStepError, RetryableStepError
from orchestrator.llm.base import LLMRequest, LLMResponse, LLMUsage
from orchestrator.llm.cache import ReplyCache
from orchestrator.llm.gateway import CallContext, LLMGateway
from orchestrator.llm.governor import RateLimits, RedisGovernor
from orchestrator.llm.outbox import CallOutbox
from orchestrator.llm.pricing import PriceTable, estimate_input_tokens
from orchestrator.state import MemoryStateStore, RedisStateStore, keys
from tests.unit.round_trips import RoundTrips, record_round_trips
from tests.unit.test_engine_attempt import SETTINGS, RecordingPublisher, deliver, run_status, start, workflow

HAIKU = "claude-haiku-4-5"


@tool(name="tests.unit.outbox_spend")
def outbox_spend(ctx: ToolContext) -> dict[str, Any]:
    """The run's LLM spend and hold as a tool sees them."""
    fields = ctx.store.run_fields(ctx.run_id)
    return {"held": fields.get("llm_held_nusd"), "calls": fields.get("llm_calls")}


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> RoundTrips:
    return record_round_trips(monkeypatch)


@pytest.fixture
def runtime(redis_url: str) -> tuple[Runtime, RecordingPublisher]:
    publisher = RecordingPublisher()
    store = RedisStateStore(redis.Redis.from_url(redis_url), retention_s=60)
    built = build_runtime(SETTINGS, publisher, store=store)
    governor = built.executor.llm.governor
    assert governor is not None
    # Known already, as in a worker that has run steps before (a script Redis forgot costs round trips of its own).
    for script in (*store._scripts.values(), governor._open, governor._close):
        store.client.script_load(script.script)
    return built, publisher


def _scripts(runtime: Runtime) -> tuple[str, str]:
    """The SHAs of the gateway's close script and of the store's finish script."""
    governor = runtime.executor.llm.governor
    store = runtime.store
    assert isinstance(governor, RedisGovernor)
    assert isinstance(store, RedisStateStore)
    return governor._close.sha, store._scripts["finish"].sha


def _llm_fields(runtime: Runtime, run_id: str) -> dict[str, str]:
    return {k: v for k, v in runtime.store.run_fields(run_id).items() if k.startswith("llm_")}


def _start_failing(rt: Runtime, publisher: RecordingPublisher, error: str) -> str:
    """Start a run (budget $1) of one llm step whose first call fails with the simulated ``error``."""
    step = {"name": "a", "uses": "llm", "with": {"prompt": "hi", "simulate": {"errors": [error]}}}
    return start(rt, publisher, {**workflow(step), "budget_usd": 1})


def test_an_llm_steps_close_goes_first_in_the_round_trip_of_its_finish(
    runtime: tuple[Runtime, RecordingPublisher], round_trips: RoundTrips
) -> None:
    rt, publisher = runtime
    steps = ({"name": "a", "uses": "llm", "with": {"prompt": "hi"}}, {"name": "b", "uses": "noop", "depends_on": ["a"]})
    run_id = start(rt, publisher, {**workflow(*steps), "budget_usd": 1})
    close, finish = _scripts(rt)

    assert deliver(rt, publisher.sent.pop(0)) == "succeeded"

    carrying = round_trips.with_script(close)
    assert len(carrying) == 1, round_trips.trips
    assert f"EVALSHA {finish}" in carrying[0], "the close rides with the finish, not on its own"
    assert carrying[0].index(f"EVALSHA {close}") < carrying[0].index(f"EVALSHA {finish}"), "and goes first"
    fields = _llm_fields(rt, run_id)
    assert (fields["llm_held_nusd"], fields["llm_calls"]) == ("0", "1")
    assert int(fields["llm_spent_nusd"]) > 0
    assert isinstance(rt.store, RedisStateStore)
    stored = rt.store.client.hlen(keys.llm_run_cache_key(run_id))
    assert stored == 1, "the reply is stored with it (kept while the run goes on)"


def test_a_call_that_failed_for_good_is_settled_with_the_steps_failure(
    runtime: tuple[Runtime, RecordingPublisher], round_trips: RoundTrips
) -> None:
    rt, publisher = runtime
    run_id = _start_failing(rt, publisher, "bad_request")
    close, finish = _scripts(rt)

    assert deliver(rt, publisher.sent.pop(0)) == "failed"

    assert run_status(rt, run_id) == "failed"
    carrying = round_trips.with_script(close)
    assert len(carrying) == 1, round_trips.trips
    assert f"EVALSHA {finish}" in carrying[0]
    assert _llm_fields(rt, run_id)["llm_held_nusd"] == "0", "the worst case held for the call is given back"


def test_a_call_that_failed_for_now_is_settled_before_the_step_is_queued_again(
    runtime: tuple[Runtime, RecordingPublisher], round_trips: RoundTrips
) -> None:
    rt, publisher = runtime
    run_id = _start_failing(rt, publisher, "overloaded")
    close, _ = _scripts(rt)
    assert isinstance(rt.store, RedisStateStore)
    retry = rt.store._scripts["retry"].sha
    message = publisher.sent.pop(0)

    with pytest.raises(RetryableStepError):
        deliver(rt, message)

    flat = [name for trip in round_trips.names() for name in trip]
    assert flat.count(f"EVALSHA {close}") == 1
    assert flat.index(f"EVALSHA {close}") < flat.index(f"EVALSHA {retry}"), "settled before the retry is recorded"
    assert _llm_fields(rt, run_id)["llm_held_nusd"] == "0"
    assert deliver(rt, message) == "succeeded"
    assert _llm_fields(rt, run_id)["llm_calls"] == "1", "only the call that answered is counted"


def test_a_close_owed_to_redis_is_applied_once_when_redis_has_forgotten_every_script(
    runtime: tuple[Runtime, RecordingPublisher],
) -> None:
    rt, publisher = runtime
    run_id = start(rt, publisher, {**workflow({"name": "a", "uses": "llm", "with": {"prompt": "hi"}}), "budget_usd": 1})
    message = publisher.sent.pop(0)
    executor = rt.executor
    real = executor.llm.complete

    def complete_then_forget(*args: Any, **kwargs: Any) -> Any:
        reply = real(*args, **kwargs)
        assert isinstance(rt.store, RedisStateStore)
        rt.store.client.script_flush()
        return reply

    executor.llm.complete = complete_then_forget  # type: ignore[method-assign]

    assert deliver(rt, message) == "succeeded"

    fields = _llm_fields(rt, run_id)
    assert (fields["llm_calls"], fields["llm_held_nusd"]) == ("1", "0"), "applied once, not lost nor doubled"


def _governed(redis_url: str, run_id: str, provider: Any) -> tuple[redis.Redis, RedisGovernor, LLMGateway]:
    """A running run's LLM gateway on a real Redis, with a governor and a reply cache: the client, governor, gateway."""
    client = redis.Redis.from_url(redis_url)
    client.hset(keys.run_key(run_id), mapping={"status": "running"})
    governor = RedisGovernor(client, RateLimits())
    cache = ReplyCache(client, run_ttl_s=60, shared_ttl_s=60)
    return client, governor, LLMGateway(provider, prices=PriceTable(), governor=governor, cache=cache)


class TinyProvider:
    """Answers every call with one input and one output token (far below the worst case held for it)."""

    def complete(self, request: LLMRequest) -> LLMResponse:
        return LLMResponse("ok", request.model, LLMUsage(1, 1))


def test_a_second_call_of_an_attempt_sees_the_first_calls_real_spend_and_both_go_in_three_round_trips(
    redis_url: str, round_trips: RoundTrips
) -> None:
    run_id = f"outbox-{id(round_trips)}"
    client, governor, gateway = _governed(redis_url, run_id, TinyProvider())
    request = LLMRequest(model=HAIKU, prompt="hello", max_tokens=200)
    worst = PriceTable().worst_case(HAIKU, estimate_input_tokens("hello"), 200)
    # Room for one worst case and a half: the second call fits only once the first is settled at its real cost.
    outbox = CallOutbox()
    call = CallContext(run_id, "wf", budget_usd=worst * 1.5, step="a", outbox=outbox)
    for script in (governor._open, governor._close):
        client.script_load(script.script)  # known already, as in a worker that has called before
    round_trips.trips.clear()

    gateway.complete(request, call)
    second = gateway.complete(LLMRequest(model=HAIKU, prompt="hello again", max_tokens=200), call)
    outbox.flush()

    assert second.cost_usd
    closes = round_trips.with_script(governor._close.sha)
    assert len(round_trips.trips) == 3, round_trips.trips  # open; the first close with the second open; close
    assert [len(trip) for trip in closes] == [2, 1], "the first close goes with the second call's open"
    spent = client.hget(keys.run_key(run_id), "llm_spent_nusd")
    assert int(spent or 0) > 0
    assert client.hget(keys.run_key(run_id), "llm_held_nusd") == b"0"


def test_without_an_outbox_a_call_is_closed_at_once(redis_url: str, round_trips: RoundTrips) -> None:
    client = redis.Redis.from_url(redis_url)
    run_id = f"outbox-none-{id(round_trips)}"
    client.hset(keys.run_key(run_id), mapping={"status": "running"})
    governor = RedisGovernor(client, RateLimits())
    gateway = LLMGateway(TinyProvider(), prices=PriceTable(), governor=governor)
    round_trips.trips.clear()

    gateway.complete(LLMRequest(model=HAIKU, prompt="hello", max_tokens=200), CallContext(run_id, "wf", step="a"))

    assert round_trips.names()[-1] == [f"EVALSHA {governor._close.sha}"]
    assert client.hget(keys.run_key(run_id), "llm_held_nusd") == b"0"


def test_a_close_that_fails_is_logged_and_the_finish_still_recorded(
    runtime: tuple[Runtime, RecordingPublisher], caplog: pytest.LogCaptureFixture
) -> None:
    rt, publisher = runtime
    run_id = start(rt, publisher, workflow({"name": "a", "uses": "llm", "with": {"prompt": "hi"}}))
    message = publisher.sent.pop(0)
    governor = rt.executor.llm.governor
    assert governor is not None
    real = governor.pending_close

    def broken(*args: Any, **kwargs: Any) -> Any:
        pending = real(*args, **kwargs)
        return type(pending)(pending.client, pending.script, pending.keys, ("not", "a", "number"), pending.run_id)

    governor.pending_close = broken  # type: ignore[method-assign]

    with caplog.at_level(logging.WARNING, logger="orchestrator.llm.outbox"):
        assert deliver(rt, message) == "succeeded"

    assert run_status(rt, run_id) == "succeeded"
    assert any("could not settle" in r.message for r in caplog.records)


@dataclass
class RecordingOutbox:
    flushed: int = 0

    def take(self, client: object) -> list[Any]:
        raise AssertionError("the in-memory store has no round trip to share")

    def flush(self) -> None:
        self.flushed += 1


def test_the_in_memory_store_sends_what_is_owed_on_its_own_before_the_finish() -> None:
    store = MemoryStateStore()
    publisher = RecordingPublisher()
    rt = build_runtime(SETTINGS, publisher, store=store)
    start(rt, publisher, workflow({"name": "a", "uses": "noop"}))
    message = publisher.sent.pop(0)
    attempt = Attempt(message.run_id, "a", message.generation, message.task_id)
    rt.store.claim(attempt, lease_s=30, upstream=(), children=())
    owed = RecordingOutbox()

    assert store.finish(attempt, StepOutcome.SUCCEEDED, owed=owed).recorded

    assert owed.flushed == 1


def test_an_error_the_provider_raised_is_not_hidden_by_the_outbox(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    run_id = "outbox-error"
    client.hset(keys.run_key(run_id), mapping={"status": "running"})

    class Refusing:
        def complete(self, request: LLMRequest) -> LLMResponse:
            raise NonRetryableStepError("no", kind="bad_request")

    gateway = LLMGateway(Refusing(), prices=PriceTable(), governor=RedisGovernor(client, RateLimits()))
    outbox = CallOutbox()

    with pytest.raises(NonRetryableStepError):
        gateway.complete(LLMRequest(model=HAIKU, prompt="x"), CallContext(run_id, "wf", budget_usd=1, outbox=outbox))

    assert len(outbox) == 1, "the failed call's close waits for the attempt's next write"
    outbox.flush()
    assert client.hget(keys.run_key(run_id), "llm_held_nusd") == b"0"


def test_a_map_items_close_goes_first_in_the_round_trip_of_the_items_record(
    runtime: tuple[Runtime, RecordingPublisher], round_trips: RoundTrips
) -> None:
    rt, publisher = runtime
    step = {"name": "m", "uses": "llm", "for_each": "[1, 2]", "with": {"prompt": "hi {{ item }}"}}
    run_id = start(rt, publisher, {**workflow(step), "budget_usd": 1})
    close, _ = _scripts(rt)
    assert isinstance(rt.store, RedisStateStore)
    item_finish = rt.store._scripts["item_finish"].sha
    assert deliver(rt, publisher.sent.pop(0)).startswith("mapped")
    round_trips.trips.clear()

    results = [deliver(rt, message) for message in list(publisher.sent)]

    assert results[0] == "item succeeded"
    assert results[1].startswith("item succeeded")
    carrying = round_trips.with_script(close)
    assert len(carrying) == 2, round_trips.trips
    for trip in carrying:
        assert trip.index(f"EVALSHA {close}") < trip.index(f"EVALSHA {item_finish}")
    fields = _llm_fields(rt, run_id)
    assert (fields["llm_calls"], fields["llm_held_nusd"]) == ("2", "0")
    assert run_status(rt, run_id) == "succeeded"


def test_an_agents_turn_is_settled_before_its_tools_run_and_its_last_turn_with_its_finish(
    runtime: tuple[Runtime, RecordingPublisher], round_trips: RoundTrips
) -> None:
    rt, publisher = runtime
    script = [[{"name": "tests.unit.outbox_spend", "input": {}}]]
    step = {
        "name": "a",
        "uses": "agent",
        "with": {"prompt": "go", "tools": ["tests.unit.outbox_spend"], "simulate": {"tool_calls": script}},
    }
    run_id = start(rt, publisher, {**workflow(step), "budget_usd": 1})
    close, finish = _scripts(rt)

    assert deliver(rt, publisher.sent.pop(0)) == "succeeded"

    output = json.loads(rt.store.run_fields(run_id)["s:a:output"])
    assert output["tool_calls"][0]["output"] == {"held": "0", "calls": "1"}, "the tool sees the first turn settled"
    carrying = round_trips.with_script(close)
    assert len(carrying) == 2, round_trips.trips
    assert f"EVALSHA {finish}" in carrying[-1], "the last turn's close goes with the finish"
    fields = _llm_fields(rt, run_id)
    assert (fields["llm_calls"], fields["llm_held_nusd"]) == ("2", "0")


class CountingProvider(TinyProvider):
    def __init__(self) -> None:
        self.calls = 0

    def complete(self, request: LLMRequest) -> LLMResponse:
        self.calls += 1
        return super().complete(request)


def test_an_open_redis_applied_before_a_close_it_had_forgotten_is_given_back_and_opened_again(
    redis_url: str, round_trips: RoundTrips
) -> None:
    # Redis knows the open script, not the close (an operator loaded one, or a restart landed between the two
    # loads): the first call's close, first in the second call's round trip, is refused and sent again after the
    # second call's open, which missed the reply the close stores.
    provider = CountingProvider()
    run_id = f"outbox-overtaken-{id(round_trips)}"
    client, governor, gateway = _governed(redis_url, run_id, provider)
    request = LLMRequest(model=HAIKU, prompt="hello", max_tokens=200)
    outbox = CallOutbox()
    client.script_flush()
    client.script_load(governor._open.script)

    gateway.complete(request, CallContext(run_id, "wf", budget_usd=1, step="a", outbox=outbox))
    again = gateway.complete(request, CallContext(run_id, "wf", budget_usd=1, step="b", outbox=outbox))
    outbox.flush()

    opens = [trip for trip in round_trips.names() if f"EVALSHA {governor._open.sha}" in trip]
    assert [len(trip) for trip in opens] == [1, 2, 1], "the second open is run again after the close"
    assert again.cached, "and is answered the first call's reply"
    assert provider.calls == 1
    assert client.hget(keys.run_key(run_id), "llm_held_nusd") == b"0", "what it held the first time is given back"
    assert client.hget(keys.run_key(run_id), "llm_calls") == b"1"


def test_a_governor_that_loads_the_open_script_loads_the_close_first(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    run_id = f"outbox-loads-{uuid.uuid4().hex}"
    client.hset(keys.run_key(run_id), mapping={"status": "running"})
    governor = RedisGovernor(client, RateLimits())
    client.script_flush()

    admission, _ = governor.open_call(
        run_id=run_id, model=HAIKU, tokens=10, worst_case_usd=0.0, budget_usd=None, caller=""
    )

    assert admission.outcome == "ok"
    assert client.script_exists(governor._open.sha, governor._close.sha) == [True, True]
