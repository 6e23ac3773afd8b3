"""A map whose publish outlasts the dispatch grace sends no item twice while its publish is under way.

Publishing thousands of item messages on a loaded broker can take longer than ``ORCH_QUEUED_GRACE_S`` while the
workers keep the queues empty, so the sweeper sees no backlog its items could be waiting in: it used to send again
every item the publish had not reached yet. Here the map step runs in this process with a publisher that takes a
few milliseconds per message (a loaded broker's cost) and records every message sent, the sweeper's copies too,
while the real sweep runs alongside against a private Redis; no queue holds anything, so nothing looks like a
backlog.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import pytest
import redis

from orchestrator import Client, Settings
from orchestrator.definition.spec import WorkflowSpec
from orchestrator.domain import Attempt
from orchestrator.engine import mapping
from orchestrator.engine.attempt import execute_attempt
from orchestrator.engine.priorities import redis_queue_lists
from orchestrator.engine.runtime import Runtime, build_runtime
from orchestrator.engine.sweep import sweep_once
from orchestrator.state import keys
from orchestrator.state.base import StateStore
from tests.conftest import private_redis as start_private_redis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GRACE_S = 3.0
ITEMS = 1000
PER_MESSAGE_S = 0.007
"""What one message costs to send (7 ms, with its claim more): the map's 1,000 take over 7 s, more than twice the grace
by this sleep alone however fast Redis answers, and a full group of 500 would take longer than the grace: the groups
must shrink to the broker's pace."""

SPEC = {
    "name": "long_publish",
    "inputs": {"xs": {"type": "array"}},
    "steps": [{"name": "m", "uses": "noop", "for_each": "inputs.xs"}],
}


class SlowPublisher:
    """Takes ``PER_MESSAGE_S`` to send each item message, records it, and has a worker take it at once: the item is
    claimed for a long attempt, as busy workers keeping the queues empty would."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.sent: list[tuple[int, str]] = []
        self.stamps: set[float | None] = set()
        self.sizes: list[int] = []
        self._lock = threading.Lock()

    def publish(
        self,
        spec: WorkflowSpec,
        *,
        run_id: str,
        steps: Sequence[str],
        generation: str,
        task_ids: Mapping[str, str] | None = None,
    ) -> None:
        raise AssertionError(f"no step but the map's items is sent: {steps}")

    def publish_items(
        self,
        spec: WorkflowSpec,
        *,
        run_id: str,
        step: str,
        generation: str,
        items: Sequence[tuple[int, str]],
        sent_at: float | None = None,
    ) -> None:
        self.stamps.add(sent_at)
        self.sizes.append(len(items))
        for index, task_id in items:
            time.sleep(PER_MESSAGE_S)  # the broker's cost of one message (work, not a wait for anything)
            with self._lock:
                self.sent.append((index, task_id))
            self.store.claim_item(Attempt(run_id, step, generation, task_id, index), lease_s=600.0, upstream=())

    def revoke(self, task_ids: Sequence[str]) -> None:
        pass


@pytest.fixture
def settings() -> Iterator[Settings]:
    with start_private_redis() as server:
        yield Settings.from_env({"REDIS_URL": server.url, "ORCH_QUEUED_GRACE_S": str(GRACE_S)})


class Sweeper(threading.Thread):
    """Sweeps again and again until stopped, as the sweepers of a busy deployment would."""

    def __init__(self, runtime: Runtime, raw: redis.Redis) -> None:
        super().__init__(name="test-sweeper", daemon=True)
        self.runtime, self.raw = runtime, raw
        self.stopped = threading.Event()
        self.sweeps = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopped.is_set():
                self.raw.delete(keys.SWEEPER_LOCK)  # every pass a sweep, not one per interval
                sweep_once(self.runtime, owner="test-sweeper")
                self.sweeps += 1
                self.stopped.wait(0.05)
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def test_items_a_long_publish_has_not_reached_yet_are_not_sent_again_by_the_sweeper(settings: Settings) -> None:
    raw = redis.Redis.from_url(settings.redis_url)
    client = Client(settings)
    run_id = client.submit(SPEC, {"xs": list(range(ITEMS))})
    # The root's message is taken by this test, as a worker takes it: the queues stay empty.
    raw.delete(*redis_queue_lists(settings.cpu_queue), *redis_queue_lists(settings.llm_queue))
    (member,) = [m.decode() for m in raw.zrange(keys.LEASES, 0, -1) if m.decode().startswith(f"{run_id}|m|")]
    fields = client.store.run_fields(run_id)
    publisher = SlowPublisher(client.store)
    runtime = build_runtime(settings, publisher)
    sweeper = Sweeper(runtime, raw)
    sweeper.start()
    try:
        started = time.monotonic()
        what = execute_attempt(
            runtime, Attempt(run_id, "m", fields["gen"], keys.parse_lease_member(member)[2]), fields["def_hash"]
        )
        took = time.monotonic() - started
    finally:
        sweeper.stopped.set()
        sweeper.join(timeout=60)
        runtime.leases.stop()
    assert sweeper.error is None, sweeper.error
    assert what == f"mapped: {ITEMS} items, {ITEMS} queued"
    assert took > 2 * GRACE_S, "the publish must outlast the grace for this test to mean anything"
    assert sweeper.sweeps > 0

    sends = collections.Counter(index for index, _ in publisher.sent)
    assert sorted(sends) == list(range(ITEMS))
    assert [index for index, n in sends.items() if n > 1] == []
    # Every group carried the stamp of the publish's start, as one group's messages do; none was a full 500.
    assert len(publisher.stamps) == 1
    assert None not in publisher.stamps
    assert 1 < max(publisher.sizes) < mapping.PUBLISH_CHUNK
