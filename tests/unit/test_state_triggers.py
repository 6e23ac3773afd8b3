"""The store contract for trigger rules, against both stores: early release exactly once, ``cancel_others``, the
run's status following its leaves, and ``always`` steps starting with the roots."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from orchestrator.definition.spec import WorkflowSpec, parse_workflow
from orchestrator.domain import Attempt, ClaimOutcome, FinishResult, StepOutcome
from orchestrator.engine.triggers import release_rules
from orchestrator.state import keys
from tests.unit import test_state_contract as contract
from tests.unit.test_state_contract import LONG_LEASE_S, Backend, attempt, start, step_fields

# The contract's fixtures: each test runs against the Redis store and the in-memory one.
backend = contract.backend
contract_redis = contract.contract_redis

pytestmark = pytest.mark.timeout(30)


def join(rule: str, parents: int = 2, **extra: Any) -> WorkflowSpec:
    """Parents p0, p1, ... joined by ``join`` under ``rule``."""
    names = [f"p{i}" for i in range(parents)]
    steps: list[dict[str, Any]] = [{"name": n, "uses": "noop"} for n in names]
    steps.append({"name": "join", "uses": "noop", "depends_on": names, "trigger_rule": rule, **extra})
    return parse_workflow({"name": f"join_{rule}", "steps": steps})


def claim(backend: Backend, spec: WorkflowSpec, at: Attempt) -> None:
    got = backend.store.claim(
        at, lease_s=LONG_LEASE_S, upstream=spec.graph.parents[at.step], children=spec.graph.children[at.step]
    )
    assert got.outcome == ClaimOutcome.OK, got


def finish(backend: Backend, spec: WorkflowSpec, at: Attempt, outcome: StepOutcome) -> FinishResult:
    return backend.store.finish(
        at, outcome, children=spec.graph.children[at.step], rules=release_rules(spec, at.step), grace_s=60.0
    )


def run_step(backend: Backend, spec: WorkflowSpec, step: str, outcome: StepOutcome) -> FinishResult:
    at = attempt(step)
    claim(backend, spec, at)
    return finish(backend, spec, at, outcome)


def queued_events(backend: Backend, step: str) -> int:
    return sum(1 for e in backend.store.events("run1") if e.type == "step_queued" and e.step == step)


@pytest.mark.parametrize(
    ("rule", "outcome"),
    [("one_success", StepOutcome.SUCCEEDED), ("one_failed", StepOutcome.FAILED), ("one_done", StepOutcome.FAILED)],
)
def test_a_one_rule_releases_its_step_at_the_first_qualifying_parent_and_never_again(
    backend: Backend, rule: str, outcome: StepOutcome
) -> None:
    spec = join(rule, parents=3)
    start(backend, spec)
    claim(backend, spec, attempt("p1"))

    assert run_step(backend, spec, "p0", outcome).released == ("join",)
    assert step_fields(backend, "p1")["status"] == "running"
    assert run_step(backend, spec, "p2", StepOutcome.SUCCEEDED).released == ()
    assert finish(backend, spec, attempt("p1"), StepOutcome.SUCCEEDED).released == ()
    assert queued_events(backend, "join") == 1
    assert step_fields(backend, "join")["status"] == "queued"


def test_a_parent_that_does_not_qualify_leaves_a_one_success_step_waiting(backend: Backend) -> None:
    spec = join("one_success")
    start(backend, spec)
    assert run_step(backend, spec, "p0", StepOutcome.FAILED).released == ()
    assert step_fields(backend, "join")["status"] == "pending"
    assert run_step(backend, spec, "p1", StepOutcome.FAILED).released == ("join",)


@pytest.mark.parametrize("parents", [2, 4])
def test_parents_succeeding_at_the_same_moment_release_a_one_success_step_exactly_once(
    backend: Backend, parents: int
) -> None:
    spec = join("one_success", parents=parents)
    start(backend, spec)
    attempts = [attempt(f"p{i}") for i in range(parents)]
    for at in attempts:
        claim(backend, spec, at)
    barrier = threading.Barrier(parents)

    def finish_now(at: Attempt) -> tuple[str, ...]:
        barrier.wait(timeout=10)
        return finish(backend, spec, at, StepOutcome.SUCCEEDED).released

    with ThreadPoolExecutor(parents) as pool:
        released = list(pool.map(finish_now, attempts))

    assert sorted(released) == [()] * (parents - 1) + [("join",)]
    assert queued_events(backend, "join") == 1


def test_cancel_others_cancels_the_parents_still_unfinished_and_the_run_still_succeeds(backend: Backend) -> None:
    spec = join("one_success", parents=3, cancel_others=True)
    start(backend, spec)
    slow = attempt("p1", "slow-task")
    claim(backend, spec, slow)

    first = run_step(backend, spec, "p0", StepOutcome.SUCCEEDED)

    assert first.released == ("join",)
    # p1 was running (its task is interrupted); p2 never started (no task to revoke; its message finds it cancelled).
    assert sorted(first.cancelled) == [("p1", "slow-task"), ("p2", "")]
    assert {s: step_fields(backend, s)["status"] for s in ("p1", "p2")} == {"p1": "cancelled", "p2": "cancelled"}
    cancelled = [e for e in backend.store.events("run1") if e.type == "step_cancelled"]
    assert [(e.step, e.data) for e in cancelled] == [
        ("p1", {"reason": "step join fired first"}),
        ("p2", {"reason": "step join fired first"}),
    ]
    assert not finish(backend, spec, slow, StepOutcome.SUCCEEDED).recorded
    assert backend.store.claim(attempt("p2"), lease_s=1.0, upstream=(), children=("join",)).outcome == (
        ClaimOutcome.DONE
    )
    last = run_step(backend, spec, "join", StepOutcome.SUCCEEDED)
    assert last.run_status == "succeeded"


def test_a_cancelled_parent_ends_for_its_other_children_as_cancelled(backend: Backend) -> None:
    spec = parse_workflow(
        {
            "name": "hedge_with_a_tail",
            "steps": [
                {"name": "fast", "uses": "noop"},
                {"name": "slow", "uses": "noop"},
                {"name": "join", "uses": "noop", "depends_on": ["fast", "slow"], "trigger_rule": "one_success"}
                | {"cancel_others": True},
                {"name": "audit", "uses": "noop", "depends_on": ["slow"], "trigger_rule": "all_done"},
            ],
        }
    )
    start(backend, spec)
    claim(backend, spec, attempt("slow"))

    fast = attempt("fast")
    claim(backend, spec, fast)
    first = backend.store.finish(
        fast,
        StepOutcome.SUCCEEDED,
        children=spec.graph.children["fast"],
        rules=release_rules(spec, "fast"),
        grace_s=contract.SHORT_LEASE_S,
    )
    assert set(first.released) == {"join", "audit"}
    # The grandchild released through the cancelled parent is covered too, under the task id it is published with.
    covers = {keys.lease_member("run1", s, first.task_ids[s]) for s in ("join", "audit")}
    assert backend.wait_past(contract.SHORT_LEASE_S, lambda: covers <= set(backend.store.expired_leases()))
    run_step(backend, spec, "join", StepOutcome.SUCCEEDED)
    assert run_step(backend, spec, "audit", StepOutcome.SUCCEEDED).run_status == "succeeded"


def test_a_parent_failing_after_its_join_fired_leaves_the_run_to_its_leaves(backend: Backend) -> None:
    spec = join("one_success")
    start(backend, spec)
    late = attempt("p1")
    claim(backend, spec, late)
    run_step(backend, spec, "p0", StepOutcome.SUCCEEDED)
    run_step(backend, spec, "join", StepOutcome.SUCCEEDED)

    assert finish(backend, spec, late, StepOutcome.FAILED).run_status == "succeeded"
    assert backend.store.run_fields("run1")["failures"] == "1"


def test_a_failed_leaf_fails_the_run(backend: Backend) -> None:
    spec = join("one_success")
    start(backend, spec)
    run_step(backend, spec, "p0", StepOutcome.SUCCEEDED)
    run_step(backend, spec, "p1", StepOutcome.SUCCEEDED)
    assert run_step(backend, spec, "join", StepOutcome.FAILED).run_status == "failed"


def test_an_always_step_is_queued_with_the_roots_and_never_released_again(backend: Backend) -> None:
    spec = join("always")
    start(backend, spec)
    assert step_fields(backend, "join")["status"] == "queued"
    assert run_step(backend, spec, "p0", StepOutcome.FAILED).released == ()
    assert run_step(backend, spec, "p1", StepOutcome.SUCCEEDED).released == ()
    assert queued_events(backend, "join") == 1
