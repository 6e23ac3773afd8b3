"""The threads pool's room for the children a finish keeps beyond its slot's own (``workers/local.py``).

Runs against Celery's real threads pool (its ``ThreadPoolExecutor``), with jobs that wait on events the test sets.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.concurrency.thread import TaskPool as ThreadsPool

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

    assert threads.spare() == 0
    assert threads.spawn(lambda: None) is False


def test_children_waiting_for_a_thread_use_up_the_room_until_they_start(pool: ThreadsPool) -> None:
    threads = WorkerThreads()
    threads.attach(pool)
    gate, ran = threading.Event(), []
    assert threads.spare() == 2

    for name in ("a", "b", "c", "d"):
        assert threads.spawn(blocker(gate, ran, name))  # type: ignore[arg-type]

    wait_for(lambda: len(ran) == 2, what="two jobs to take the pool's two threads")
    assert threads.spare() == 0, "two wait for a thread: as many as the pool has"
    gate.set()
    wait_for(lambda: len(ran) == 4, what="the waiting jobs to run")
    assert threads.spare() == 2


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
    assert threads.spare() == 0
    assert threads.spawn(lambda: None) is False


def test_a_child_the_pool_drops_as_it_stops_is_logged_and_frees_its_room(
    pool: ThreadsPool, caplog: pytest.LogCaptureFixture
) -> None:
    threads, gate, ran = two_running_one_waiting(pool)
    assert threads.spare() == 1

    pool.executor.shutdown(wait=False, cancel_futures=True)  # as the pool's on_stop does, with "c" still waiting

    assert threads.spare() == 2, "nothing waits any more"
    assert "left to its lease" in caplog.text
    assert ran == ["a", "b"]
    gate.set()
