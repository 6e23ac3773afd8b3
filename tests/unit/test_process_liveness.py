"""The lease keeper: one heartbeat per process covers its long attempts; an idle process sends nothing.

The store half (owners, dead owners, ``reclaim(..., owner_dead=True)``) is in the contract suite
(``test_state_contract.py``), against both stores.
"""

from __future__ import annotations

import time

import pytest

from orchestrator.domain import Attempt, ClaimOutcome
from orchestrator.engine import leases
from orchestrator.engine.leases import BACKSTOP_LEASES, LeaseKeeper, lease_member
from orchestrator.state import MemoryStateStore, keys
from tests.integration.helpers import wait_for
from tests.unit.test_state_contract import SINGLE, Backend, attempt, start


def test_the_keeper_covers_a_long_attempt_with_its_process_beat_and_leaves_when_idle() -> None:
    store = MemoryStateStore()
    start(Backend("memory", store), SINGLE)
    lease_s = 0.3
    assert store.claim(attempt("a", "t1"), lease_s=lease_s, upstream=(), children=()).outcome == ClaimOutcome.OK
    keeper = LeaseKeeper(store, lease_s, owner="proc-1")
    held = attempt("a", "t1")
    keeper.hold(held)
    keeper.stop()  # beats are driven by hand below

    # A third of a lease later a beat covers it: in the owner's set, its own lease pushed out to the backstop.
    wait_for(lambda: keeper.beat() or store.owned("proc-1") == [lease_member(held)], timeout=5, what="the cover")
    assert store.owner_alive("proc-1")
    lease = float(store.run_fields("run1")[keys.step_field("a", "lease")])
    assert lease >= time.time() + lease_s * BACKSTOP_LEASES * 0.9

    keeper.release(held)
    keeper.beat()

    assert store.owned("proc-1") == []
    assert not store.owner_alive("proc-1")
    assert store.dead_owners() == []


def test_the_keeper_sends_nothing_for_an_attempt_shorter_than_a_third_of_a_lease() -> None:
    store = MemoryStateStore()
    keeper = LeaseKeeper(store, 60.0, owner="proc-1")
    keeper.stop()
    keeper.hold(attempt("a", "t1"))
    keeper.beat()
    keeper.release(attempt("a", "t1"))
    keeper.beat()

    assert store.owned("proc-1") == []
    assert not store.owner_alive("proc-1")


class _Clock:
    """Stands in for the keeper's ``time`` module: monotonic time moves only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def _claimed(monkeypatch: pytest.MonkeyPatch, lease_s: float) -> tuple[_Clock, MemoryStateStore, Attempt]:
    """A store on a clock the test moves, with step ``a`` of a run claimed under task ``t1``."""
    clock = _Clock()
    monkeypatch.setattr(leases, "time", clock)
    store = MemoryStateStore()
    start(Backend("memory", store), SINGLE)
    claimed = attempt("a", "t1")
    assert store.claim(claimed, lease_s=lease_s, upstream=(), children=()).outcome == ClaimOutcome.OK
    return clock, store, claimed


def test_a_slot_beats_for_a_starved_beat_thread_not_for_a_healthy_one(monkeypatch: pytest.MonkeyPatch) -> None:
    lease_s = 6.0
    clock, store, long = _claimed(monkeypatch, lease_s)
    beats: list[float] = []
    keep_owner = store.keep_owner

    def counted(owner: str, lease: float, **kw: list[str]) -> None:
        beats.append(clock.now)
        keep_owner(owner, lease, **kw)

    monkeypatch.setattr(store, "keep_owner", counted)
    keeper = LeaseKeeper(store, lease_s, owner="proc-1")
    monkeypatch.setattr(keeper, "_run", lambda: None)  # the beat thread never gets the GIL
    keeper.hold(long)

    # Other slots come and go while the beat thread is a quarter of a lease late: nothing is sent for it.
    clock.now += lease_s / 4
    keeper.hold(attempt("b", "t2"))
    keeper.release(attempt("b", "t2"))
    assert beats == []

    # Half a lease without a beat: the next slot to claim or finish beats, covering the long attempt.
    clock.now += lease_s / 4
    keeper.hold(attempt("c", "t3"))
    assert beats == [clock.now]
    assert store.owned("proc-1") == [lease_member(long)]
    assert store.owner_alive("proc-1")

    # One beat per half lease, not one per slot.
    keeper.release(attempt("c", "t3"))
    assert len(beats) == 1
    clock.now += lease_s / 2
    keeper.release(attempt("c", "t3"))
    assert len(beats) == 2


def test_the_cover_is_due_a_third_of_a_lease_after_the_claim_was_sent_not_after_its_reply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lease_s = 6.0
    clock, store, held = _claimed(monkeypatch, lease_s)
    keeper = LeaseKeeper(store, lease_s, owner="proc-1")
    keeper.stop()  # beats are driven by hand below

    # The claim went out 3 s ago; its thread got the reply only now. The next beat must cover it (held from "now",
    # it would wait another third of a lease, while 3 s of its 6 s claim lease are gone).
    keeper.hold(held, since=clock.now - lease_s / 2)
    keeper.beat()

    assert store.owned("proc-1") == [lease_member(held)]
    assert store.owner_alive("proc-1")
