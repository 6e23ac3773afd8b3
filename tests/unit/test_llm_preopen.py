"""A kept ``llm`` child's first call is opened in the round trip of its parent's finish.

Against a real Redis (the scripts are Lua), with the worker's side recorded (``test_engine_local``): every round trip
is recorded (``test_llm_outbox``) to see where each open script went; the run's budget fields and the model's rate
limit show that whatever was opened ahead and not taken was given back.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from typing import Any

import pytest
import redis

from orchestrator.definition.spec import LLMParams
from orchestrator.engine.runtime import Runtime, build_runtime
from orchestrator.engine.steps import StepContext
from orchestrator.errors import NonRetryableStepError
from orchestrator.llm.gateway import CallContext
from orchestrator.llm.governor import RedisGovernor
from orchestrator.llm.preopen import PreOpen
from orchestrator.state import RedisStateStore, keys
from tests.unit.round_trips import RoundTrips
from tests.unit.test_engine_attempt import SETTINGS, RecordingPublisher, run_status, start, workflow
from tests.unit.test_engine_local import RecordingLocalSteps, deliver
from tests.unit.test_llm_outbox import round_trips

__all__ = ["round_trips"]  # the fixture, used by name

RPM = 6
"""The test model's requests per minute: its bucket refills by 0.1 a second, so a request given back shows."""


@pytest.fixture
def model() -> str:
    # A model of its own: its rate limit is this test's alone on a shared Redis.
    return f"claude-preopen-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def local_runtime(redis_url: str, model: str) -> tuple[Runtime, RecordingPublisher, RecordingLocalSteps]:
    publisher = RecordingPublisher()
    store = RedisStateStore(redis.Redis.from_url(redis_url), retention_s=60)
    settings = replace(SETTINGS, llm_limits=json.dumps({model: {"rpm": RPM}}))
    built = build_runtime(settings, publisher, store=store)
    governor = built.executor.llm.governor
    assert isinstance(governor, RedisGovernor)
    for script in (*store._scripts.values(), governor._open, governor._close):
        store.client.script_load(script.script)
    local = RecordingLocalSteps()
    built.local = local
    return built, publisher, local


def _open_sha(rt: Runtime) -> str:
    governor = rt.executor.llm.governor
    assert isinstance(governor, RedisGovernor)
    return f"EVALSHA {governor._open.sha}"


def _finish_sha(rt: Runtime) -> str:
    assert isinstance(rt.store, RedisStateStore)
    return f"EVALSHA {rt.store._scripts['finish'].sha}"


def _llm(name: str, model: str, prompt: str, after: str | None = None, **more: Any) -> dict[str, Any]:
    step: dict[str, Any] = {"name": name, "uses": "llm", "with": {"prompt": prompt, "model": model, **more}}
    if after is not None:
        step["depends_on"] = [after]
    return step


def _chain(model: str, **more: Any) -> dict[str, Any]:
    return {
        **workflow(
            _llm("a", model, "Write about {{ inputs.topic }}.", **more),
            _llm("b", model, "Summarise: {{ steps.a.output.text }}", "a", **more),
            _llm("c", model, "Title for: {{ steps.b.output.text }}", "b", **more),
        ),
        "budget_usd": 5,
    }


def _requests(rt: Runtime, model: str) -> float:
    assert isinstance(rt.store, RedisStateStore)
    return float(rt.store.client.hget(keys.llm_limiter_key(model), "requests") or RPM)


def _llm_fields(rt: Runtime, run_id: str) -> dict[str, str]:
    return {k: v for k, v in rt.store.run_fields(run_id).items() if k.startswith("llm_")}


def test_a_local_chain_of_llm_steps_opens_each_kept_childs_call_in_its_parents_finish(
    local_runtime: tuple[Runtime, RecordingPublisher, RecordingLocalSteps],
    round_trips: RoundTrips,
    model: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt, publisher, _ = local_runtime
    run_id = start(rt, publisher, _chain(model), topic="otters")
    opened, finish = _open_sha(rt), _finish_sha(rt)
    rendered: list[str] = []
    render = rt.executor.render_prompt

    def counted(prompt: str, *args: Any) -> tuple[str, str | None]:
        rendered.append(prompt)
        return render(prompt, *args)

    monkeypatch.setattr(rt.executor, "render_prompt", counted)
    round_trips.trips.clear()

    assert deliver(rt, publisher.sent.pop(0)) == "succeeded"

    assert run_status(rt, run_id) == "succeeded"
    with_open = [trip for trip in round_trips.names() if opened in trip]
    alone = [trip for trip in with_open if finish not in trip]
    assert len(alone) == 1, with_open  # the first step's own open; b's and c's rode their parents' finishes
    riding = [trip for trip in with_open if finish in trip]
    assert len(riding) == 2, with_open
    assert all(trip.index(finish) < trip.index(opened) for trip in riding), "each open goes after the claim"
    fields = _llm_fields(rt, run_id)
    assert (fields["llm_held_nusd"], fields["llm_calls"]) == ("0", "3")
    # Three requests counted, once each (the bucket refills 0.1 a second meanwhile).
    assert RPM - 3 <= _requests(rt, model) < RPM - 2.5
    outputs = {s: rt.store.run_fields(run_id)[keys.step_field(s, "output")] for s in "abc"}
    assert all(json.loads(out)["text"] for out in outputs.values())
    assert len(rendered) == 3, "each prompt rendered once: a child uses what its parent rendered for it"


def test_a_kept_child_that_makes_no_call_gives_back_what_was_opened_for_it(
    local_runtime: tuple[Runtime, RecordingPublisher, RecordingLocalSteps],
    round_trips: RoundTrips,
    model: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt, publisher, _ = local_runtime
    definition = {**workflow(_llm("a", model, "Hi."), _llm("b", model, "On: {{ steps.a.output.text }}", "a"))}
    run_id = start(rt, publisher, {**definition, "budget_usd": 5})
    run = rt.executor.run

    def refuse_b(step: Any, ctx: StepContext, call: CallContext, deadline: float | None = None) -> Any:
        if step.name == "b":
            raise NonRetryableStepError("b gives up before calling", kind="exception")
        return run(step, ctx, call, deadline)

    monkeypatch.setattr(rt.executor, "run", refuse_b)
    round_trips.trips.clear()

    deliver(rt, publisher.sent.pop(0))

    opened, finish = _open_sha(rt), _finish_sha(rt)
    assert any(opened in trip and finish in trip for trip in round_trips.names()), "b's call was opened ahead"
    fields = _llm_fields(rt, run_id)
    assert fields["llm_held_nusd"] == "0", "its worst case is no longer held"
    assert fields["llm_calls"] == "1"
    assert RPM - 1 <= _requests(rt, model) < RPM - 0.5, "its request is back in the rate limit"
    assert "budget_exhausted" not in fields


def test_a_kept_child_whose_request_differs_gives_the_open_back_and_opens_its_own(
    local_runtime: tuple[Runtime, RecordingPublisher, RecordingLocalSteps],
    round_trips: RoundTrips,
    model: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt, publisher, _ = local_runtime
    run_id = start(rt, publisher, _chain(model), topic="otters")
    pre_open = rt.executor.pre_open

    def foretell_wrongly(step: Any, ctx: StepContext, call: CallContext, task_id: str) -> PreOpen | None:
        wrong = {name: {"text": "something else"} for name in ctx.outputs}
        return pre_open(step, replace(ctx, outputs=wrong), call, task_id)

    monkeypatch.setattr(rt.executor, "pre_open", foretell_wrongly)
    round_trips.trips.clear()

    assert deliver(rt, publisher.sent.pop(0)) == "succeeded"

    opened, finish = _open_sha(rt), _finish_sha(rt)
    alone = [trip for trip in round_trips.names() if opened in trip and finish not in trip]
    assert len(alone) == 3, "b and c open their own calls"
    close = f"EVALSHA {rt.executor.llm.governor._close.sha}"  # type: ignore[union-attr]
    assert all(close in trip and trip.index(close) < trip.index(opened) for trip in alone[1:]), (
        "what was opened ahead is given back first, in the same round trip"
    )
    fields = _llm_fields(rt, run_id)
    assert (fields["llm_held_nusd"], fields["llm_calls"]) == ("0", "3")
    assert RPM - 3 <= _requests(rt, model) < RPM - 2.5, "the opens ahead were given back"


def test_a_reply_the_open_ahead_finds_in_the_cache_is_served_as_a_cached_reply(
    local_runtime: tuple[Runtime, RecordingPublisher, RecordingLocalSteps], round_trips: RoundTrips, model: str
) -> None:
    rt, publisher, _ = local_runtime
    definition = _chain(model, reply_cache="shared")
    first = start(rt, publisher, definition, topic=f"cache {model}")
    assert deliver(rt, publisher.sent.pop(0)) == "succeeded"
    requests = _requests(rt, model)
    second = start(rt, publisher, {**definition, "name": definition["name"] + "_again"}, topic=f"cache {model}")
    round_trips.trips.clear()

    assert deliver(rt, publisher.sent.pop(0)) == "succeeded"

    opened, finish = _open_sha(rt), _finish_sha(rt)
    assert len([trip for trip in round_trips.names() if opened in trip and finish not in trip]) == 1
    for step in "bc":
        output = json.loads(rt.store.run_fields(second)[keys.step_field(step, "output")])
        assert output["reply_cached"] is True
        assert output["text"] == json.loads(rt.store.run_fields(first)[keys.step_field(step, "output")])["text"]
    fields = _llm_fields(rt, second)
    assert fields.get("llm_calls", "0") == "0"
    assert fields.get("llm_held_nusd", "0") == "0"
    assert _requests(rt, model) >= requests, "a cached reply takes no request"


def test_a_child_its_parents_finish_does_not_release_is_not_opened(
    local_runtime: tuple[Runtime, RecordingPublisher, RecordingLocalSteps], round_trips: RoundTrips, model: str
) -> None:
    rt, publisher, _ = local_runtime
    steps = (
        _llm("a", model, "Hi."),
        _llm("b", model, "Hello."),
        {**_llm("c", model, "On: {{ steps.a.output.text }}"), "depends_on": ["a", "b"]},
    )
    run_id = start(rt, publisher, {**workflow(*steps), "budget_usd": 5})
    first = next(m for m in publisher.sent if m.step == "a")
    publisher.sent.remove(first)
    round_trips.trips.clear()

    assert deliver(rt, first) == "succeeded"

    opened, finish = _open_sha(rt), _finish_sha(rt)
    assert not any(opened in trip and finish in trip for trip in round_trips.names()), "c reads b: not foretold"
    fields = _llm_fields(rt, run_id)
    assert (fields["llm_held_nusd"], fields["llm_calls"]) == ("0", "1")


def test_an_open_ahead_for_a_step_not_claimed_under_its_task_id_does_nothing(
    local_runtime: tuple[Runtime, RecordingPublisher, RecordingLocalSteps], model: str
) -> None:
    rt, publisher, _ = local_runtime
    run_id = start(rt, publisher, {**workflow(_llm("a", model, "Hi.")), "budget_usd": 5})
    gateway = rt.executor.llm
    assert gateway.governor is not None
    call = CallContext(run_id, "w", budget_usd=5, step="a")
    step = rt.store.load_definition(rt.store.run_fields(run_id)["def_hash"]).steps_by_name["a"]
    assert isinstance(step.params, LLMParams)
    request = rt.executor.llm_request(step, step.params, StepContext(run_id, "a", 1, {}, {}), None)
    ahead = gateway.pre_open(request, call, task_id="not-its-task")
    assert ahead is not None
    pipe = gateway.governor.client.pipeline(transaction=False)
    ahead.queue(pipe)
    ahead.answered(pipe.execute()[0])

    assert not ahead.holds
    assert ahead.give_back() is None
    fields = _llm_fields(rt, run_id)
    assert fields.get("llm_held_nusd", "0") == "0"
    assert _requests(rt, model) == RPM, "nothing was counted"
    assert rt.store.run_fields(run_id)[keys.step_field("a", "status")] == "queued"


def test_only_the_children_the_finish_is_to_claim_are_opened_ahead(
    local_runtime: tuple[Runtime, RecordingPublisher, RecordingLocalSteps], round_trips: RoundTrips, model: str
) -> None:
    rt, publisher, _ = local_runtime  # a slot with no spare thread: the finish keeps one child
    steps = (_llm("a", model, "Hi."), _llm("b", model, "B: {{ steps.a.output.text }}", "a"))
    run_id = start(rt, publisher, {**workflow(*steps, _llm("c", model, "C: {{ steps.a.output.text }}", "a"))})
    opened, finish = _open_sha(rt), _finish_sha(rt)
    round_trips.trips.clear()

    assert deliver(rt, publisher.sent.pop(0)) == "succeeded"

    riding = [trip for trip in round_trips.names() if opened in trip and finish in trip]
    assert [trip.count(opened) for trip in riding] == [1], riding
    assert [m.step for m in publisher.sent] == ["c"]
    fields = _llm_fields(rt, run_id)
    assert (fields.get("llm_held_nusd", "0"), fields["llm_calls"]) == ("0", "2")


def test_an_open_ahead_redis_applied_before_the_close_it_had_forgotten_is_given_back_and_the_cache_answers(
    local_runtime: tuple[Runtime, RecordingPublisher, RecordingLocalSteps],
    round_trips: RoundTrips,
    model: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Redis knows the open script, not the close (an operator loaded one, or a restart landed between the two loads):
    # a's close, first in its finish's round trip, is refused and sent again after b's open ahead, which then missed
    # a's stored reply.
    rt, publisher, _ = local_runtime
    steps = (_llm("a", model, "The same question."), _llm("b", model, "The same question.", "a"))
    run_id = start(rt, publisher, {**workflow(*steps), "budget_usd": 5})
    gateway = rt.executor.llm
    governor = gateway.governor
    assert isinstance(governor, RedisGovernor)
    assert isinstance(rt.store, RedisStateStore)
    client, real = rt.store.client, gateway.complete

    def complete_then_forget_the_close(*args: Any, **kwargs: Any) -> Any:
        reply = real(*args, **kwargs)
        if not client.script_exists(governor._close.sha)[0]:
            return reply
        client.script_flush()
        for script in (*rt.store._scripts.values(), governor._open):
            client.script_load(script.script)
        return reply

    monkeypatch.setattr(gateway, "complete", complete_then_forget_the_close)
    round_trips.trips.clear()

    assert deliver(rt, publisher.sent.pop(0)) == "succeeded"

    opened, finish = _open_sha(rt), _finish_sha(rt)
    assert any(opened in trip and finish in trip for trip in round_trips.names()), "b's call was opened ahead"
    output = json.loads(rt.store.run_fields(run_id)[keys.step_field("b", "output")])
    assert output.get("reply_cached") is True, "b is answered a's reply, stored by the close sent again"
    fields = _llm_fields(rt, run_id)
    assert (fields["llm_held_nusd"], fields["llm_calls"]) == ("0", "1"), "the open ahead was given back"
    assert RPM - 1 <= _requests(rt, model) < RPM - 0.5, "its request is back in the rate limit"
