"""The store contract for map steps' items, against both stores (the ``lua/item_*.lua`` scripts and their memory
twins): expansion and refills under ``max_parallel``, claims, retries, the step's counters, stop, reclaim, paging,
and a resume that keeps the items that succeeded."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import replace

import pytest

from orchestrator.definition.spec import WorkflowSpec, parse_workflow
from orchestrator.domain import (
    Attempt,
    ChildTotals,
    ClaimOutcome,
    ItemDispatch,
    ParentLink,
    ResumePlan,
    RunStatus,
    StepOutcome,
)
from orchestrator.state import keys
from orchestrator.state.items import item_counts
from tests.unit import test_state_contract as contract
from tests.unit.test_state_contract import GRACE_S, LONG_LEASE_S, LOST, SHORT_LEASE_S, Backend, start

backend = contract.backend
contract_redis = contract.contract_redis

pytestmark = pytest.mark.timeout(30)

MAP = parse_workflow(
    {
        "name": "map",
        "steps": [
            {"name": "m", "uses": "noop", "for_each": "inputs.xs"},
            {"name": "after", "uses": "noop", "depends_on": ["m"]},
        ],
    }
)


def expand(
    backend: Backend,
    spec: WorkflowSpec,
    n: int,
    *,
    max_parallel: int = 0,
    keys_: list[str] | None = None,
    generation: str = "1",
    task: str = "task-m",
    grace_s: float = GRACE_S,
) -> ItemDispatch:
    at = Attempt("run1", "m", generation, task)
    got = backend.store.claim(at, lease_s=LONG_LEASE_S, upstream=(), children=spec.graph.children["m"])
    assert got.outcome == ClaimOutcome.OK, got
    items = [json.dumps(f"x{i}") for i in range(n)]
    return backend.store.expand_items(at, items, keys_ or [""] * n, max_parallel=max_parallel, grace_s=grace_s)


def item(index: int, task: str, generation: str = "1") -> Attempt:
    return Attempt("run1", "m", generation, task, index)


def counts(backend: Backend) -> dict[str, int]:
    found = item_counts(backend.store.run_fields("run1"), "m")
    assert found is not None
    return dict(found)


def run_item(backend: Backend, index: int, task: str, outcome: StepOutcome = StepOutcome.SUCCEEDED) -> ItemDispatch:
    got = backend.store.claim_item(item(index, task), lease_s=LONG_LEASE_S, upstream=())
    assert got.outcome == ClaimOutcome.OK, got
    return backend.store.finish_item(item(index, task), outcome, output={"i": index}, grace_s=GRACE_S)


def test_max_parallel_queues_that_many_and_each_finish_queues_the_next(backend: Backend) -> None:
    start(backend, MAP, inputs={"xs": []})
    first = expand(backend, MAP, 5, max_parallel=2)
    assert [i for i, _ in first.publish] == [0, 1]
    assert counts(backend) == {
        "total": 5,
        "pending": 3,
        "queued": 2,
        "running": 0,
        "waiting": 0,
        "succeeded": 0,
        "failed": 0,
        "skipped": 0,
        "cancelled": 0,
    }
    claimed = backend.store.claim_item(item(0, first.publish[0][1]), lease_s=LONG_LEASE_S, upstream=())
    assert (claimed.outcome, claimed.item, claimed.count, claimed.attempt) == (ClaimOutcome.OK, "x0", 5, 1)
    done = backend.store.finish_item(item(0, first.publish[0][1]), StepOutcome.SUCCEEDED, output={"i": 0})
    assert [i for i, _ in done.publish] == [2]
    assert not done.all_ended
    assert counts(backend)["queued"] == 2
    assert counts(backend)["succeeded"] == 1


def test_an_item_is_claimed_once_and_a_finished_one_is_done(backend: Backend) -> None:
    start(backend, MAP, inputs={"xs": []})
    task = expand(backend, MAP, 1).publish[0][1]
    assert backend.store.claim_item(item(0, "someone-else"), lease_s=LONG_LEASE_S, upstream=()).outcome == "superseded"
    assert backend.store.claim_item(item(0, task), lease_s=LONG_LEASE_S, upstream=()).outcome == ClaimOutcome.OK
    again = backend.store.claim_item(item(0, task), lease_s=LONG_LEASE_S, upstream=())
    assert (again.outcome, again.detail) == (ClaimOutcome.BUSY, "own")
    last = backend.store.finish_item(item(0, task), StepOutcome.SUCCEEDED, output=[1])
    assert last.all_ended
    assert last.step_task == "task-m"
    done = backend.store.claim_item(item(0, task), lease_s=LONG_LEASE_S, upstream=())
    assert (done.outcome, done.detail) == (ClaimOutcome.DONE, "succeeded")
    assert backend.store.finish_item(item(0, task), StepOutcome.SUCCEEDED).recorded is False


def test_outputs_come_back_in_item_order_with_the_first_failure(backend: Backend) -> None:
    start(backend, MAP, inputs={"xs": []})
    tasks = dict(expand(backend, MAP, 3).publish)
    for index in (2, 0):
        run_item(backend, index, tasks[index])
    backend.store.claim_item(item(1, tasks[1]), lease_s=LONG_LEASE_S, upstream=())
    error = {"type": "exception", "message": "bad"}
    backend.store.finish_item(item(1, tasks[1]), StepOutcome.FAILED, error=error)
    outputs, bad = backend.store.item_outputs("run1", "m")
    assert outputs == [{"i": 0}, None, {"i": 2}]
    assert bad == [(1, "failed", error)]
    page = backend.store.item_records("run1", "m", 1, 5)
    assert [(r["index"], r["item"], r["status"], r["error"]) for r in page] == [
        (1, "x1", "failed", error),
        (2, "x2", "succeeded", None),
    ]
    assert backend.store.item_records("run1", "m", 0, 10**9)[0]["index"] == 0


def test_a_retry_requeues_the_item_under_its_task_and_a_deferral_gives_the_attempt_back(backend: Backend) -> None:
    start(backend, MAP, inputs={"xs": []})
    task = expand(backend, MAP, 1).publish[0][1]
    backend.store.claim_item(item(0, task), lease_s=LONG_LEASE_S, upstream=())
    assert backend.store.retry_item(item(0, task), dict(LOST), countdown_s=1.0, grace_s=GRACE_S)
    assert counts(backend)["queued"] == 1
    assert backend.store.claim_item(item(0, task), lease_s=LONG_LEASE_S, upstream=()).attempt == 2
    assert backend.store.retry_item(item(0, task), None, countdown_s=1.0, grace_s=GRACE_S, counted=False)
    assert backend.store.claim_item(item(0, task), lease_s=LONG_LEASE_S, upstream=()).attempt == 2


def test_stop_cancels_every_unfinished_item_and_returns_those_to_interrupt(backend: Backend) -> None:
    start(backend, MAP, inputs={"xs": []})
    tasks = dict(expand(backend, MAP, 4, max_parallel=2).publish)
    backend.store.claim_item(item(0, tasks[0]), lease_s=LONG_LEASE_S, upstream=())
    backend.store.stop("run1", RunStatus.CANCELLED, "test", ("m", "after"))
    assert sorted(backend.store.stop_items("run1", "m", "1")) == sorted(tasks.values())
    assert counts(backend)["cancelled"] == 4
    assert backend.store.finish_item(item(0, tasks[0]), StepOutcome.SUCCEEDED).recorded is False


def test_a_lost_item_is_requeued_under_a_new_task_by_the_sweeper(backend: Backend) -> None:
    start(backend, MAP, inputs={"xs": []})
    task = expand(backend, MAP, 1).publish[0][1]
    backend.store.claim_item(item(0, task), lease_s=SHORT_LEASE_S, upstream=())
    member = keys.lease_member("run1", "m#0", task)
    assert backend.wait_past(SHORT_LEASE_S, lambda: member in backend.store.expired_leases())
    found = backend.store.reclaim_item(member, "task-new", LOST, grace_s=GRACE_S)
    assert found is not None
    assert (found.step, found.index, found.task_id) == ("m", 0, "task-new")
    assert counts(backend)["queued"] == 1
    assert backend.store.claim_item(item(0, "task-new"), lease_s=LONG_LEASE_S, upstream=()).attempt == 2


def due_within(backend: Backend, seconds: float, member: str) -> bool:
    """Whether ``member`` falls due in the lease index within ``seconds`` from now (Redis: polled to a deadline)."""
    if backend.clock is not None:
        backend.clock.advance(seconds)
        return member in backend.store.expired_leases()
    deadline = backend.now() + seconds
    while backend.now() < deadline:
        if member in backend.store.expired_leases():
            return True
        time.sleep(0.02)
    return member in backend.store.expired_leases()


def test_a_backlog_holds_a_queued_item_a_grace_at_a_time_and_resends_it_once_per_wait(backend: Backend) -> None:
    # A map sends its items in one burst, so while they wait the oldest waiting message is their own and the
    # sweeper's backlog wait is about the time since they were queued: a hold only to its end brought all of a
    # 10,000-item map's waiting items back at every sweep.
    grace = 1.0
    start(backend, MAP, inputs={"xs": []})
    queued = backend.now()
    task = expand(backend, MAP, 1, grace_s=grace).publish[0][1]
    member = keys.lease_member("run1", "m#0", task)
    assert backend.wait_past(grace, lambda: member in backend.store.expired_leases())
    wait = backend.now() - queued + 0.1
    assert backend.store.reclaim_item(member, "task-new", LOST, grace_s=grace, backlog_wait_s=wait) is None
    assert not due_within(backend, grace / 2, member)
    # Waited past the backlog wait (the cap of a long backlog): sent again under its own task id, once.
    assert backend.wait_past(grace, lambda: member in backend.store.expired_leases())
    found = backend.store.reclaim_item(member, "task-new", LOST, grace_s=grace, backlog_wait_s=0.1)
    assert found is not None
    assert found.task_id == task
    # The copy sent now may be waiting in turn: the same wait holds it again rather than resending at every grace.
    assert backend.wait_past(grace, lambda: member in backend.store.expired_leases())
    assert backend.store.reclaim_item(member, "task-new", LOST, grace_s=grace, backlog_wait_s=2 * grace) is None
    assert counts(backend)["queued"] == 1
    assert backend.store.claim_item(item(0, task), lease_s=LONG_LEASE_S, upstream=()).attempt == 1


def test_a_resume_keeps_items_that_succeeded_under_the_same_key_and_requeues_the_rest(backend: Backend) -> None:
    start(backend, MAP, inputs={"xs": []})
    tasks = dict(expand(backend, MAP, 3, keys_=["k0", "k1", "k2"]).publish)
    run_item(backend, 0, tasks[0])
    run_item(backend, 1, tasks[1], StepOutcome.FAILED)
    run_item(backend, 2, tasks[2])
    backend.store.stop("run1", RunStatus.CANCELLED, "test", ("m", "after"))
    plan = ResumePlan("1", ("cancelled",), (("m", "queued", 0), ("after", "pending", 1)))
    assert backend.store.resume("run1", plan).generation == "2"
    again = expand(backend, MAP, 3, keys_=["k0", "k1", "changed"], generation="2", task="task-m2")
    assert [i for i, _ in again.publish] == [1, 2]
    assert counts(backend)["succeeded"] == 1
    assert backend.store.item_outputs("run1", "m")[0][0] == {"i": 0}


def test_a_waiting_item_holds_its_place_and_its_childs_end_takes_it_over_and_counts_spend_once(
    backend: Backend,
) -> None:
    start(backend, MAP, inputs={"xs": []})
    tasks = dict(expand(backend, MAP, 3, max_parallel=2).publish)
    assert backend.store.claim_item(item(0, tasks[0]), lease_s=LONG_LEASE_S, upstream=()).outcome == ClaimOutcome.OK
    assert not backend.store.wait_item_child(item(0, "someone-else"), "child-0")
    assert backend.store.wait_item_child(item(0, tasks[0]), "child-0")
    assert (counts(backend)["running"], counts(backend)["waiting"], counts(backend)["pending"]) == (0, 1, 1)
    assert backend.store.waiting_children("run1", "m") == ["child-0"]
    assert backend.store.item_records("run1", "m", 0, 1)[0]["child_run_id"] == "child-0"
    link = ParentLink("run1", "m", 0, "1", 2)
    totals = ChildTotals(spent_nusd=7, calls=1)
    assert not backend.store.child_item_ended(replace(link, generation="2"), "child-0", totals, task_id="t", lease_s=9)
    assert not backend.store.child_item_ended(link, "child-other", totals, task_id="t", lease_s=9)
    assert backend.store.child_item_ended(link, "child-0", totals, task_id="tk", lease_s=LONG_LEASE_S)
    assert not backend.store.child_item_ended(link, "child-0", totals, task_id="tk2", lease_s=LONG_LEASE_S)
    fields = backend.store.run_fields("run1")
    assert (fields["llm_spent_nusd"], fields["llm_calls"]) == ("7", "1")
    assert counts(backend)["running"] == 1
    done = backend.store.finish_item(item(0, "tk"), StepOutcome.SUCCEEDED, output={"c": 0}, grace_s=GRACE_S)
    assert done.recorded
    assert [i for i, _ in done.publish] == [2]


def test_stop_cancels_a_waiting_item_without_a_task_to_interrupt(backend: Backend) -> None:
    start(backend, MAP, inputs={"xs": []})
    tasks = dict(expand(backend, MAP, 1).publish)
    backend.store.claim_item(item(0, tasks[0]), lease_s=LONG_LEASE_S, upstream=())
    assert backend.store.wait_item_child(item(0, tasks[0]), "child-0")
    backend.store.stop("run1", RunStatus.CANCELLED, "test", ("m", "after"))
    assert backend.store.stop_items("run1", "m", "1") == []
    assert (counts(backend)["cancelled"], counts(backend)["waiting"]) == (1, 0)


def _die_after_first_round_trip(store: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the worker "die" right after its next pipeline reached Redis: every later command raises."""
    real = store._pipeline  # type: ignore[attr-defined]

    def then_die(*commands: object, **options: object) -> object:
        replies = real(*commands, **options)
        monkeypatch.setattr(store.client, "pipeline", _dead)  # type: ignore[attr-defined]
        monkeypatch.setattr(store.client, "zadd", _dead)  # type: ignore[attr-defined]
        monkeypatch.setattr(store.client, "zrem", _dead)  # type: ignore[attr-defined]
        return replies

    monkeypatch.setattr(store, "_pipeline", then_die)


def _dead(*_: object, **__: object) -> None:
    raise ConnectionError("the worker died here")


def test_items_an_expansion_queues_are_in_the_lease_index_before_any_publish(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend.client is None:
        pytest.skip("a window of the Redis store: between its round trips")
    start(backend, MAP, inputs={"xs": []})
    at = Attempt("run1", "m", "1", "task-m")
    backend.store.claim(at, lease_s=LONG_LEASE_S, upstream=(), children=MAP.graph.children["m"])
    _die_after_first_round_trip(backend.store, monkeypatch)
    with contextlib.suppress(ConnectionError):  # dead or not, nothing after the first round trip may be needed
        backend.store.expand_items(at, [json.dumps(i) for i in range(3)], [""] * 3, max_parallel=2, grace_s=GRACE_S)
    monkeypatch.undo()

    queued = {i: backend.client.hget(keys.items_key("run1", "m"), f"{i}:task") for i in range(3)}
    assert queued[2] in (None, b"", "")
    for i in (0, 1):
        task = queued[i].decode() if isinstance(queued[i], bytes) else queued[i]
        assert (
            backend.client.zscore(backend.store._leases("run1"), keys.lease_member("run1", f"m#{i}", str(task)))
            is not None
        )


def test_a_refill_lost_with_its_finishing_worker_is_held_and_sent_by_the_sweeper(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend.client is None:
        pytest.skip("a window of the Redis store: between its round trips")
    start(backend, MAP, inputs={"xs": []})
    task0 = expand(backend, MAP, 3, max_parallel=1).publish[0][1]
    backend.store.claim_item(item(0, task0), lease_s=SHORT_LEASE_S, upstream=())
    _die_after_first_round_trip(backend.store, monkeypatch)
    with pytest.raises(ConnectionError):
        backend.store.finish_item(item(0, task0), StepOutcome.SUCCEEDED, output={"i": 0}, grace_s=GRACE_S)
    monkeypatch.undo()
    raw = backend.client.hget(keys.items_key("run1", "m"), "1:task")
    task1 = raw.decode() if isinstance(raw, bytes) else str(raw)
    refill = keys.lease_member("run1", "m#1", task1)
    assert backend.client.zscore(backend.store._leases("run1"), refill) is None, "the refill was queued but never held"

    own = keys.lease_member("run1", "m#0", task0)
    assert backend.wait_past(SHORT_LEASE_S, lambda: own in backend.store.expired_leases())
    assert backend.store.reclaim_item(own, "task-x", LOST, grace_s=GRACE_S) is None
    assert own not in backend.store.expired_leases()
    assert refill in backend.store.expired_leases(), "held by the finished item's reclaim, due at once"
    found = backend.store.reclaim_item(refill, "task-y", LOST, grace_s=GRACE_S)
    assert found is not None
    assert (found.index, found.task_id) == (1, task1), "sent again under the task id its lost message carried"
    assert counts(backend)["succeeded"] == 1


def test_items_held_while_their_publish_is_under_way_fall_due_a_grace_later_and_others_are_left_alone(
    backend: Backend,
) -> None:
    # A long map is published a group at a time: the items not sent yet when the expansion's holds are about to fall
    # due are held for another grace, so the sweeper does not take them for lost.
    grace = 1.0
    start(backend, MAP, inputs={"xs": []})
    tasks = dict(expand(backend, MAP, 3, grace_s=grace).publish)
    backend.store.claim_item(item(0, tasks[0]), lease_s=LONG_LEASE_S, upstream=())
    members = {i: keys.lease_member("run1", f"m#{i}", t) for i, t in tasks.items()}
    assert backend.wait_past(grace, lambda: {members[1], members[2]} <= set(backend.store.expired_leases()))

    # Item 2 is named under a task it no longer has (sent again meanwhile): not this publish's to hold.
    backend.store.extend_item_holds("run1", "m", [(0, tasks[0]), (1, tasks[1]), (2, "task-old")], grace_s=grace)

    due = set(backend.store.expired_leases())
    assert members[1] not in due
    assert members[2] in due
    assert members[0] not in due  # running under its claim's lease, untouched
    assert backend.store.reclaim_item(members[1], "task-new", LOST, grace_s=grace) is None
    resent = backend.store.reclaim_item(members[2], "task-new", LOST, grace_s=grace)
    assert resent is not None
    assert resent.task_id == tasks[2]
    # A grace after the hold, an item whose message never came is sent again as any other.
    assert backend.wait_past(grace, lambda: members[1] in backend.store.expired_leases())
    found = backend.store.reclaim_item(members[1], "task-new", LOST, grace_s=grace)
    assert found is not None
    assert found.task_id == tasks[1]
    assert counts(backend)["running"] == 1
