"""The lease keeper: one heartbeat per process covers its long attempts; an idle process sends nothing.

The store half (owners, dead owners, ``reclaim(..., owner_dead=True)``) is in the contract suite
(``test_state_contract.py``), against both stores.
"""

from __future__ import annotations

import time

from orchestrator.domain import ClaimOutcome
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
