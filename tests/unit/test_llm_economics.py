"""Prices, the Redis governor (budgets, shared rate limits, cool-downs), the reply cache and the gateway."""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from typing import Any

import fakeredis
import pytest
import redis

from orchestrator.errors import NonRetryableStepError, OrchestratorError, RetryableStepError, StepDeferred
from orchestrator.llm import governor as governor_module
from orchestrator.llm.base import LLMRequest, LLMResponse, LLMUsage
from orchestrator.llm.cache import ReplyCache, decode_reply, encode_reply, request_digest
from orchestrator.llm.gateway import CallContext, LLMGateway
from orchestrator.llm.governor import Limit, RateLimits, RedisGovernor, Settlement, from_nano_usd, to_nano_usd
from orchestrator.llm.pricing import PriceTable
from orchestrator.state import keys

HAIKU = "claude-haiku-4-5"


@pytest.fixture(params=["folded", "unfolded"])
def r(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> redis.Redis:
    """A Redis; the gateway opens and closes each call with one script each (``folded``), or, as on a Redis
    Cluster, with the separate scripts and commands (``unfolded``)."""
    if request.param == "unfolded":
        monkeypatch.setattr(governor_module, "is_cluster_client", lambda client: True)
    return fakeredis.FakeRedis()


def _run(r: redis.Redis, run_id: str = "run1") -> str:
    r.hset(keys.run_key(run_id), mapping={"status": "running"})
    return run_id


class FakeProvider:
    """Counts calls; answers with fixed usage, or raises the queued errors first."""

    def __init__(self, *errors: Exception, output_tokens: int = 100) -> None:
        self.errors = list(errors)
        self.calls: list[LLMRequest] = []
        self.output_tokens = output_tokens
        self.lock = threading.Lock()

    def complete(self, request: LLMRequest) -> LLMResponse:
        with self.lock:
            self.calls.append(request)
            if self.errors:
                raise self.errors.pop(0)
        return LLMResponse("reply " + request.prompt, request.model, LLMUsage(1000, self.output_tokens))


def _gateway(r: redis.Redis, provider: FakeProvider, limits: dict[str, Limit] | None = None) -> LLMGateway:
    return LLMGateway(
        provider,
        prices=PriceTable(),
        governor=RedisGovernor(r, RateLimits(limits)),
        cache=ReplyCache(r, run_ttl_s=60, shared_ttl_s=60),
    )


def _request(prompt: str = "hello", model: str = HAIKU, max_tokens: int = 200) -> LLMRequest:
    return LLMRequest(model=model, prompt=prompt, max_tokens=max_tokens)


# -- prices --------------------------------------------------------------------------------------------------------


def test_prices_match_dated_model_ids_by_longest_prefix() -> None:
    table = PriceTable()
    assert table.cost("claude-haiku-4-5-20251001", {"input_tokens": 1_000_000, "output_tokens": 0}) == 1.0
    assert table.cost("claude-opus-4-1-20250805", {"input_tokens": 0, "output_tokens": 1_000_000}) == 75.0
    assert table.cost("claude-opus-4-5", {"input_tokens": 0, "output_tokens": 1_000_000}) == 25.0
    assert table.cost("gpt-unknown", {"input_tokens": 10, "output_tokens": 10}) is None


def test_prompt_cache_tokens_are_priced_apart_from_plain_input() -> None:
    usage = {
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_read_input_tokens": 1_000_000,
        "cache_creation_input_tokens": 1_000_000,
    }
    assert PriceTable().cost(HAIKU, usage) == pytest.approx(0.1 + 1.25)


def test_price_overrides_come_from_json_and_bad_json_names_the_setting() -> None:
    table = PriceTable.from_json(
        '{"my-model": {"input": 2, "output": 4}, "claude-haiku-4-5": {"input": 9, "output": 9}}'
    )
    assert table.cost("my-model", {"input_tokens": 500_000, "output_tokens": 500_000}) == 3.0
    assert table.cost(HAIKU, {"input_tokens": 1_000_000, "output_tokens": 0}) == 9.0
    with pytest.raises(OrchestratorError, match="ORCH_LLM_PRICES"):
        PriceTable.from_json('{"m": {"input": 1}}')
    with pytest.raises(OrchestratorError, match="ORCH_LLM_PRICES"):
        PriceTable.from_json('{"m": {"input": -1, "output": 1}}')


def test_an_unpriced_model_is_held_at_the_dearest_price() -> None:
    table = PriceTable()
    assert table.worst_case("mystery", 0, 1_000_000) == 75.0


def test_limits_parse_and_match_by_prefix_with_a_default() -> None:
    limits = RateLimits.from_json('{"claude-haiku-4-5": {"rpm": 50, "tpm": 1000}, "*": {"rpm": 5}}')
    assert limits.for_model("claude-haiku-4-5-20251001") == Limit(50, 1000)
    assert limits.for_model("claude-sonnet-4-5") == Limit(5, 0)
    assert RateLimits().for_model(HAIKU) == Limit()
    with pytest.raises(OrchestratorError, match="ORCH_LLM_LIMITS"):
        RateLimits.from_json('{"m": {"rps": 1}}')


def test_nano_dollars_round_up_and_back() -> None:
    assert to_nano_usd(0.000000001) == 1
    assert to_nano_usd(1.5) == 1_500_000_000
    assert from_nano_usd(to_nano_usd(0.25)) == 0.25


# -- the governor ----------------------------------------------------------------------------------------------------


def test_requests_per_minute_admit_the_bucket_then_name_the_wait(r: redis.Redis) -> None:
    gov = RedisGovernor(r, RateLimits({HAIKU: Limit(rpm=2)}))
    run = _run(r)
    admit = [gov.admit(run_id=run, model=HAIKU, tokens=10, worst_case_usd=0, budget_usd=None) for _ in range(3)]
    assert [a.outcome for a in admit] == ["ok", "ok", "rate_limit"]
    assert 25 < admit[2].wait_s <= 30  # one request every 30 s at 2 per minute


def test_a_lower_burst_spaces_requests_out(r: redis.Redis) -> None:
    gov = RedisGovernor(r, RateLimits({HAIKU: Limit(rpm=60, burst=1)}))
    run = _run(r)
    first = gov.admit(run_id=run, model=HAIKU, tokens=1, worst_case_usd=0, budget_usd=None)
    second = gov.admit(run_id=run, model=HAIKU, tokens=1, worst_case_usd=0, budget_usd=None)
    assert first.outcome == "ok"
    assert second.outcome == "rate_limit"
    assert 0.5 < second.wait_s <= 1.0


def test_waiting_callers_are_booked_first_come_first_served_and_pass_when_they_return(r: redis.Redis) -> None:
    gov = RedisGovernor(r, RateLimits({HAIKU: Limit(rpm=60, burst=1)}))
    run = _run(r)

    def ask(caller: str) -> tuple[str, float]:
        answer = gov.admit(run_id=run, model=HAIKU, tokens=1, worst_case_usd=0, budget_usd=None, caller=caller)
        return answer.outcome, answer.wait_s

    assert ask("a")[0] == "ok"
    b_outcome, b_wait = ask("b")
    c_outcome, c_wait = ask("c")
    assert (b_outcome, c_outcome) == ("rate_limit", "rate_limit")
    assert 0.5 < b_wait <= 1.0
    assert 1.5 < c_wait <= 2.0, "c queues behind b's booking, not beside it"
    assert ask("b") == ("ok", 0.0), "b's booked place lets it through when it comes back"
    assert ask("d")[1] > c_wait, "b's return was not charged again: d queues after c"


def test_tokens_per_minute_count_the_estimate_and_settle_the_real_use(r: redis.Redis) -> None:
    gov = RedisGovernor(r, RateLimits({HAIKU: Limit(tpm=1000)}))
    run = _run(r)
    assert gov.admit(run_id=run, model=HAIKU, tokens=800, worst_case_usd=0, budget_usd=None).outcome == "ok"
    refused = gov.admit(run_id=run, model=HAIKU, tokens=800, worst_case_usd=0, budget_usd=None)
    assert refused.outcome == "rate_limit"
    assert refused.wait_s > 30  # 600 tokens short at 1000 per minute
    # The first call used only 100 of its 800: settling gives 700 back, and the second call fits.
    gov.settle(
        Settlement(
            run_id=run, model=HAIKU, tokens_estimated=800, tokens_used=100, worst_case_usd=0, cost_usd=0, billed=True
        )
    )
    assert gov.admit(run_id=run, model=HAIKU, tokens=800, worst_case_usd=0, budget_usd=None).outcome == "ok"


def test_a_cool_down_stops_every_workers_calls_to_that_model_only(r: redis.Redis) -> None:
    worker_a, worker_b = RedisGovernor(r), RedisGovernor(r)
    run = _run(r)
    worker_a.cool_down(HAIKU, 5.0)
    held = worker_b.admit(run_id=run, model=HAIKU, tokens=1, worst_case_usd=0, budget_usd=None)
    assert held.outcome == "cooldown"
    assert 4 < held.wait_s <= 5
    other = worker_b.admit(run_id=run, model="claude-sonnet-4-5", tokens=1, worst_case_usd=0, budget_usd=None)
    assert other.outcome == "ok"


def test_a_budget_holds_worst_cases_settles_real_costs_and_refuses_for_good(r: redis.Redis) -> None:
    gov = RedisGovernor(r)
    run = _run(r)
    assert gov.admit(run_id=run, model=HAIKU, tokens=1, worst_case_usd=0.6, budget_usd=1.0).outcome == "ok"
    # 0.6 held: another 0.6 could pass the budget.
    refused = gov.admit(run_id=run, model=HAIKU, tokens=1, worst_case_usd=0.6, budget_usd=1.0)
    assert refused.outcome == "budget_exceeded"
    assert refused.spent_usd == pytest.approx(0.6)
    gov.settle(
        Settlement(
            run_id=run, model=HAIKU, tokens_estimated=1, tokens_used=1, worst_case_usd=0.6, cost_usd=0.1, billed=True
        )
    )
    fields = {k.decode(): v.decode() for k, v in r.hgetall(keys.run_key(run)).items()}
    assert fields["llm_held_nusd"] == "0"
    assert from_nano_usd(int(fields["llm_spent_nusd"])) == pytest.approx(0.1)
    assert fields["llm_calls"] == "1"
    # Only 0.1 spent now, but the run's budget was refused once: no further call starts.
    assert gov.admit(run_id=run, model=HAIKU, tokens=1, worst_case_usd=0.01, budget_usd=1.0).outcome == (
        "budget_exceeded"
    )


def test_a_settle_after_redis_forgot_its_scripts_is_counted_once(r: redis.Redis) -> None:
    # Only the budget script is known again (as after a restart where another worker settled first): the settle
    # script must be loaded and run on its own, without the budget being settled a second time.
    gov = RedisGovernor(r, RateLimits({HAIKU: Limit(tpm=1000)}))
    run = _run(r)
    assert gov.admit(run_id=run, model=HAIKU, tokens=800, worst_case_usd=0.5, budget_usd=None).outcome == "ok"
    r.script_flush()
    r.script_load(gov._budget.script)

    gov.settle(
        Settlement(
            run_id=run,
            model=HAIKU,
            tokens_estimated=800,
            tokens_used=100,
            worst_case_usd=0.5,
            cost_usd=0.2,
            billed=True,
        )
    )

    fields = {k.decode(): v.decode() for k, v in r.hgetall(keys.run_key(run)).items()}
    assert (fields["llm_held_nusd"], fields["llm_calls"]) == ("0", "1")
    assert from_nano_usd(int(fields["llm_spent_nusd"])) == pytest.approx(0.2)
    # The tokens came back too: 900 of the 1,000 per minute are free again.
    assert gov.admit(run_id=run, model=HAIKU, tokens=900, worst_case_usd=0, budget_usd=None).outcome == "ok"


def test_concurrent_admissions_never_hold_more_than_the_budget(r: redis.Redis) -> None:
    gov = RedisGovernor(r)
    run = _run(r)
    outcomes: list[str] = []
    lock = threading.Lock()

    def ask() -> None:
        answer = gov.admit(run_id=run, model=HAIKU, tokens=1, worst_case_usd=0.1, budget_usd=0.5)
        with lock:
            outcomes.append(answer.outcome)

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 5


def test_a_refused_budget_gives_the_request_back_to_the_rate_limit(r: redis.Redis) -> None:
    gov = RedisGovernor(r, RateLimits({HAIKU: Limit(rpm=1)}))
    run = _run(r)
    assert gov.admit(run_id=run, model=HAIKU, tokens=1, worst_case_usd=2, budget_usd=1).outcome == "budget_exceeded"
    other = _run(r, "run2")
    assert gov.admit(run_id=other, model=HAIKU, tokens=1, worst_case_usd=0, budget_usd=None).outcome == "ok"


# -- the gateway ----------------------------------------------------------------------------------------------------


def test_an_identical_request_in_the_same_run_is_paid_for_once(r: redis.Redis) -> None:
    provider = FakeProvider()
    gateway = _gateway(r, provider)
    ctx = CallContext(_run(r), "wf")
    first = gateway.complete(_request(), ctx)
    second = gateway.complete(_request(), ctx)
    assert len(provider.calls) == 1
    assert (first.cached, second.cached) == (False, True)
    assert first.cost_usd == pytest.approx((1000 * 1 + 100 * 5) / 1e6)
    assert second.cost_usd == 0.0
    assert second.response.text == first.response.text


def test_a_reply_stored_by_a_worker_that_died_serves_the_redelivery(r: redis.Redis) -> None:
    ctx = CallContext(_run(r), "wf")
    _gateway(r, FakeProvider()).complete(_request(), ctx)  # then the worker is killed before recording the step
    provider = FakeProvider()
    again = _gateway(r, provider).complete(_request(), ctx)
    assert provider.calls == []
    assert again.cached


def test_replies_are_shared_across_runs_only_when_asked(r: redis.Redis) -> None:
    provider = FakeProvider()
    gateway = _gateway(r, provider)
    gateway.complete(_request(), CallContext(_run(r, "a"), "wf", reply_cache="shared"))
    assert gateway.complete(_request(), CallContext(_run(r, "b"), "wf", reply_cache="shared")).cached
    assert not gateway.complete(_request(), CallContext(_run(r, "c"), "wf")).cached
    assert not gateway.complete(_request(), CallContext(_run(r, "c"), "wf", reply_cache="off")).cached
    assert len(provider.calls) == 3


def test_the_digest_covers_what_decides_the_reply() -> None:
    base = _request()
    assert request_digest(base) == request_digest(LLMRequest(model=HAIKU, prompt="hello", max_tokens=200, attempt=3))
    for other in (
        _request(prompt="hello!"),
        _request(model="claude-sonnet-4-5"),
        _request(max_tokens=201),
        LLMRequest(model=HAIKU, prompt="hello", max_tokens=200, system="be brief"),
        LLMRequest(model=HAIKU, prompt="hello", max_tokens=200, temperature=0.5),
    ):
        assert request_digest(other) != request_digest(base)


def test_a_call_at_the_rate_limit_is_deferred_not_made(r: redis.Redis) -> None:
    provider = FakeProvider()
    gateway = _gateway(r, provider, {HAIKU: Limit(rpm=1)})
    ctx = CallContext(_run(r), "wf", reply_cache="off")
    gateway.complete(_request(), ctx)
    with pytest.raises(StepDeferred) as deferred:
        gateway.complete(_request("other"), ctx)
    assert deferred.value.reason == "rate_limit"
    assert deferred.value.countdown is not None
    assert deferred.value.countdown >= 55
    assert len(provider.calls) == 1


def test_a_429_with_retry_after_cools_the_model_down_for_every_run(r: redis.Redis) -> None:
    limited = RetryableStepError("429", kind="rate_limit", status_code=429, retry_after=4.0)
    provider = FakeProvider(limited)
    gateway = _gateway(r, provider)
    with pytest.raises(RetryableStepError) as raised:
        gateway.complete(_request(), CallContext(_run(r, "a"), "wf"))
    assert raised.value is limited
    with pytest.raises(StepDeferred) as deferred:
        gateway.complete(_request("another prompt"), CallContext(_run(r, "b"), "wf"))
    assert deferred.value.reason == "cooldown"
    assert deferred.value.countdown is not None
    assert 3 < deferred.value.countdown < 6
    assert len(provider.calls) == 1
    # A failed call is not billed and holds nothing.
    fields = r.hgetall(keys.run_key("a"))
    assert fields[b"llm_held_nusd"] == b"0"
    assert fields.get(b"llm_calls") is None


def test_a_call_that_could_pass_the_budget_fails_the_step_without_calling(r: redis.Redis) -> None:
    provider = FakeProvider()
    gateway = _gateway(r, provider)
    ctx = CallContext(_run(r), "wf", budget_usd=0.001)
    with pytest.raises(NonRetryableStepError) as refused:
        gateway.complete(_request(max_tokens=1000), ctx)  # up to 1000 output tokens at $5/M: $0.005
    assert refused.value.kind == "budget_exceeded"
    assert "budget" in str(refused.value)
    assert provider.calls == []


def test_the_run_cost_sums_what_the_provider_billed(r: redis.Redis) -> None:
    provider = FakeProvider()
    gateway = _gateway(r, provider)
    ctx = CallContext(_run(r), "wf", budget_usd=1.0)
    costs: list[Any] = [gateway.complete(_request(f"p{i}"), ctx).cost_usd for i in range(3)]
    spent = from_nano_usd(int(r.hget(keys.run_key("run1"), "llm_spent_nusd") or 0))
    assert spent == pytest.approx(sum(costs), abs=1e-9)
    assert r.hget(keys.run_key("run1"), "llm_held_nusd") == b"0"


# -- one round trip to open a call, one to close it -------------------------------------------------------------------


class CountingRedis(fakeredis.FakeRedis):
    """Counts the commands (and pipelines) sent: each is one round trip."""

    sent = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        type(self).sent += 1
        return super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        type(self).sent += 1
        return super().pipeline(transaction, shard_hint)


def test_a_call_opens_in_one_round_trip_and_closes_in_another_and_a_cached_one_takes_one() -> None:
    r = CountingRedis()
    provider = FakeProvider()
    gateway = _gateway(r, provider, {HAIKU: Limit(rpm=100, tpm=100_000)})
    ctx = CallContext(_run(r), "wf", budget_usd=1.0, step="s")
    gateway.complete(_request(), ctx)  # loads the scripts
    CountingRedis.sent = 0
    gateway.complete(_request("another"), ctx)
    assert CountingRedis.sent == 2
    CountingRedis.sent = 0
    assert gateway.complete(_request("another"), ctx).cached
    assert CountingRedis.sent == 1
    fields = r.hgetall(keys.run_key("run1"))
    assert (fields[b"llm_calls"], fields[b"llm_held_nusd"]) == (b"2", b"0")


def test_a_folded_call_after_redis_forgot_its_scripts_is_counted_once() -> None:
    r = fakeredis.FakeRedis()
    provider = FakeProvider()
    gateway = _gateway(r, provider, {HAIKU: Limit(tpm=10_000)})
    ctx = CallContext(_run(r), "wf", budget_usd=1.0)
    gateway.complete(_request("one"), ctx)
    r.script_flush()
    gateway.complete(_request("two"), ctx)
    fields = r.hgetall(keys.run_key("run1"))
    assert (fields[b"llm_calls"], fields[b"llm_held_nusd"], fields[b"llm_input_tokens"]) == (b"2", b"0", b"2000")
    assert r.hlen(keys.llm_run_cache_key("run1")) == 2


def test_a_cached_reply_is_served_even_while_the_model_cools_down_or_the_budget_is_spent(r: redis.Redis) -> None:
    provider = FakeProvider()
    gateway = _gateway(r, provider, {HAIKU: Limit(rpm=1)})
    ctx = CallContext(_run(r), "wf", budget_usd=0.002)
    first = gateway.complete(_request(), ctx)
    RedisGovernor(r).cool_down(HAIKU, 30)
    again = gateway.complete(_request(), ctx)
    assert again.cached
    assert again.response == first.response
    assert len(provider.calls) == 1
    with pytest.raises(StepDeferred):
        gateway.complete(_request("new"), ctx)
    # A fresh call (resume --from) asks the provider even with a reply stored: here it must wait like any other.
    with pytest.raises(StepDeferred):
        gateway.complete(_request(), CallContext("run1", "wf", budget_usd=0.002, fresh=True))


def _open(gov: RedisGovernor, run: str, caller: str, *, worst_case: float = 0.0, budget: float | None = None) -> str:
    admission, stored = gov.open_call(
        run_id=run, model=HAIKU, tokens=10, worst_case_usd=worst_case, budget_usd=budget, caller=caller
    )
    assert stored is None
    return admission.outcome


def test_folded_admissions_under_concurrency_never_pass_the_rate_limit_or_the_budget(
    redis_client: redis.Redis,
) -> None:
    # A real Redis, 40 threads at once, each with its own client (as separate workers would be).
    model = f"claude-test-{uuid.uuid4().hex[:8]}"
    limited = f"limited-{uuid.uuid4().hex[:8]}"
    budgeted = f"budgeted-{uuid.uuid4().hex[:8]}"
    url = redis_client.connection_pool.connection_kwargs
    for run in (limited, budgeted):
        redis_client.hset(keys.run_key(run), mapping={"status": "running"})
    # One request a minute refills: within the test the bucket's 5 are all there are.
    limits = RateLimits({model: Limit(rpm=1, burst=5)})
    outcomes: dict[str, list[str]] = {limited: [], budgeted: []}
    lock = threading.Lock()
    start = threading.Barrier(40)

    def ask(index: int) -> None:
        gov = RedisGovernor(redis.Redis(host=url["host"], port=url["port"]), limits)
        start.wait()
        run = limited if index % 2 else budgeted
        admission, _ = gov.open_call(
            run_id=run,
            model=model if run == limited else HAIKU,
            tokens=10,
            worst_case_usd=0.1,
            budget_usd=None if run == limited else 0.55,
            caller=f"c{index}",
        )
        with lock:
            outcomes[run].append(admission.outcome)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(outcomes[limited])) == ["ok", "rate_limit"]
    assert outcomes[limited].count("ok") == 5
    assert outcomes[budgeted].count("ok") == 5, "0.55 holds five calls of 0.1, never six"
    assert outcomes[budgeted].count("budget_exceeded") == 15
    assert redis_client.hget(keys.run_key(budgeted), "llm_held_nusd") == str(to_nano_usd(0.5))


def test_a_folded_admission_books_waiting_callers_and_gives_a_refused_budgets_request_back(r: redis.Redis) -> None:
    gov = RedisGovernor(r, RateLimits({HAIKU: Limit(rpm=60, burst=1)}))
    run = _run(r)
    assert _open(gov, run, "a") == "ok"
    assert _open(gov, run, "b") == "rate_limit"
    assert _open(gov, run, "b") == "ok", "b's booked place lets it through when it comes back"
    poor = _run(r, "poor")
    strict = RedisGovernor(r, RateLimits({HAIKU: Limit(rpm=1)}))
    r.delete(keys.llm_limiter_key(HAIKU))
    assert _open(strict, poor, "x", worst_case=2, budget=1) == "budget_exceeded"
    assert _open(strict, run, "y") == "ok", "the refused call's request went back to the bucket"


def test_a_stored_reply_reads_back_as_it_was_with_every_field() -> None:
    reply = LLMResponse(
        "text",
        HAIKU,
        LLMUsage(1, 2, cache_creation_input_tokens=3, cache_read_input_tokens=4),
        stop_reason="tool_use",
        request_id="req_1",
        extra={"message_id": "msg_1"},
        content=({"type": "tool_use", "id": "t1", "name": "search", "input": {"q": "x"}},),
    )
    assert decode_reply(encode_reply(reply)) == reply
    assert json.loads(encode_reply(reply)) == json.loads(json.dumps(dataclasses.asdict(reply)))
    assert set(json.loads(encode_reply(reply))) == {f.name for f in dataclasses.fields(LLMResponse)}


@pytest.mark.parametrize("folds", [True, False], ids=["folded", "unfolded"])
def test_a_model_priced_at_zero_settles_and_stores_its_reply(redis_client: redis.Redis, folds: bool) -> None:
    # A real Redis: there Lua's -0 reaches HINCRBY as "-0", which it refuses (fakeredis's Lua does not show it).
    governor = RedisGovernor(redis_client, RateLimits())
    governor.folds = folds
    gateway = LLMGateway(
        FakeProvider(),
        prices=PriceTable.from_json('{"claude-free": {"input": 0, "output": 0}}'),
        governor=governor,
        cache=ReplyCache(redis_client, run_ttl_s=60, shared_ttl_s=60),
    )
    run = _run(redis_client, f"free-{uuid.uuid4().hex[:8]}")
    ctx = CallContext(run, "wf", budget_usd=1.0)
    assert gateway.complete(_request(model="claude-free"), ctx).cost_usd == 0.0
    fields = redis_client.hgetall(keys.run_key(run))
    assert (fields["llm_held_nusd"], fields["llm_spent_nusd"], fields["llm_calls"]) == ("0", "0", "1")
    assert gateway.complete(_request(model="claude-free"), ctx).cached
