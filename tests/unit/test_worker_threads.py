"""The threads pool's room for the children a finish keeps beyond its slot's own (``workers/local.py``).

Runs against Celery's real threads pool (its ``ThreadPoolExecutor``), with jobs that wait on events the test sets,
and the backlog reader against a real Redis.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.concurrency.thread import TaskPool as ThreadsPool

from orchestrator.engine.backlog import QueueBacklog
from orchestrator.engine.priorities import redis_queue_lists
from tests.integration.helpers import wait_for
from workers.local import WorkerThreads

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pool() -> Iterator[ThreadsPool]:
    threads = ThreadsPool(limit=2)
    yield threads
    threads.executor.shutdown(wait=True, cancel_futures=True)


def blocker(gate: threading.Event, ran: list[str], name: str) -> object:
    def job() -> None:
        ran.append(name)
        gate.wait(10)

    return job


def two_running_one_waiting(pool: ThreadsPool) -> tuple[WorkerThreads, threading.Event, list[str]]:
    """Three blocking jobs handed to the two threads of ``pool``: two run (their names in the list), one waits until
    the event is set."""
    threads = WorkerThreads()
    threads.attach(pool)
    gate, ran = threading.Event(), []
    for name in ("a", "b", "c"):
        threads.spawn(blocker(gate, ran, name))  # type: ignore[arg-type]
    wait_for(lambda: len(ran) == 2, what="two jobs to start")
    return threads, gate, ran


def test_a_worker_without_a_threads_pool_has_no_room_and_takes_nothing() -> None:
    threads = WorkerThreads()
    threads.attach(PreforkPool(limit=2))

    assert threads.spare("q") == 0
    assert threads.spawn(lambda: None) is False


def test_children_waiting_for_a_thread_use_up_the_room_until_they_start(pool: ThreadsPool) -> None:
    threads = WorkerThreads()
    threads.attach(pool)
    gate, ran = threading.Event(), []
    assert threads.spare("q") == 2

    for name in ("a", "b", "c", "d"):
        assert threads.spawn(blocker(gate, ran, name))  # type: ignore[arg-type]

    wait_for(lambda: len(ran) == 2, what="two jobs to take the pool's two threads")
    assert threads.spare("q") == 0, "two wait for a thread: as many as the pool has"
    gate.set()
    wait_for(lambda: len(ran) == 4, what="the waiting jobs to run")
    assert threads.spare("q") == 2


def test_a_job_runs_marked_as_handed_over_so_it_may_keep_children_without_a_message(pool: ThreadsPool) -> None:
    threads = WorkerThreads()
    threads.attach(pool)
    seen: list[bool] = []

    assert threads.spawn(lambda: seen.append(threads.in_spawned))

    wait_for(lambda: seen, what="the job to run")
    assert seen == [True]
    assert threads.in_spawned is False


def test_a_detached_worker_waits_for_handed_over_children_to_start_and_takes_no_more(pool: ThreadsPool) -> None:
    threads, gate, ran = two_running_one_waiting(pool)
    threading.Timer(0.2, gate.set).start()

    threads.detach(wait_s=10)

    assert "c" in ran, "the waiting child started before the pool was let go"
    assert threads.spare("q") == 0
    assert threads.spawn(lambda: None) is False


def test_a_child_the_pool_drops_as_it_stops_is_logged_and_frees_its_room(
    pool: ThreadsPool, caplog: pytest.LogCaptureFixture
) -> None:
    threads, gate, ran = two_running_one_waiting(pool)
    assert threads.spare("q") == 1

    pool.executor.shutdown(wait=False, cancel_futures=True)  # as the pool's on_stop does, with "c" still waiting

    assert threads.spare("q") == 2, "nothing waits any more"
    assert "left to its lease" in caplog.text
    assert ran == ["a", "b"]
    gate.set()


class FixedBacklog:
    """A backlog reader standing in for :class:`QueueBacklog`: ``value`` messages in queue ``q``, reads counted."""

    def __init__(self, waiting: int) -> None:
        self.value, self.reads = waiting, 0

    def waiting(self, queue: str) -> int:
        self.reads += 1
        return self.value if queue == "q" else 0


def test_while_the_queues_hold_a_backlog_more_children_may_wait_up_to_four_times_the_threads(
    pool: ThreadsPool,
) -> None:
    backlog = FixedBacklog(0)
    threads = WorkerThreads()
    threads.attach(pool, backlog)  # type: ignore[arg-type]
    gate, ran = threading.Event(), []
    assert threads.spare("q") == 2
    assert backlog.reads == 0, "under the pool's own limit the backlog is not read"
    for name in ("a", "b", "c", "d"):
        assert threads.spawn(blocker(gate, ran, name))  # type: ignore[arg-type]
    wait_for(lambda: len(ran) == 2, what="two jobs to take the pool's two threads")

    assert threads.spare("q") == 0, "no backlog: another worker may have a free thread"
    backlog.value = 3
    assert threads.spare("q") == 3, "each waiting message is room for one more"
    assert threads.spare("other") == 0, "only the child's own queue counts"
    backlog.value = 100
    assert threads.spare("q") == 2 * 3, "up to three times the pool's threads beyond its own limit"
    gate.set()
    wait_for(lambda: len(ran) == 4, what="the waiting jobs to run")


def test_the_backlog_is_read_in_one_round_trip_at_most_once_per_refresh(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    queue = f"backlog-{uuid.uuid4().hex[:8]}"
    lists = redis_queue_lists(queue)
    other = f"{queue}-other"
    now = [0.0]
    backlog = QueueBacklog(client, (queue, other), refresh_s=1.0, clock=lambda: now[0])
    try:
        client.rpush(lists[0], "m1", "m2")
        client.rpush(lists[-1], "m3")
        client.rpush(other, "x")
        assert backlog.waiting(queue) == 3, "every priority list of the queue counts"
        assert backlog.waiting(other) == 1
        assert backlog.waiting("not-read") == 0

        client.rpush(lists[0], "m4")
        now[0] = 0.5
        assert backlog.waiting(queue) == 3, "trusted for the refresh interval"
        now[0] = 1.0
        assert backlog.waiting(queue) == 4
    finally:
        client.delete(*lists, other)


def test_a_backlog_redis_cannot_tell_counts_as_none() -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    assert QueueBacklog(dead, ("llm",)).waiting("llm") == 0
