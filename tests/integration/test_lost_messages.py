"""A step message lost before any claim is sent again after one grace while the queues are busy, and a step still
waiting behind an older backlog is not sent twice.

The shape of the 2026-12-01 chaos stall: a worker took a step's message from the queue and was SIGKILLed before it
claimed the step (or died between recording a parent and publishing it), so the step stayed ``queued`` with its
dispatch hold in the lease index and no message anywhere, while other runs kept the queues from ever being empty. The
sweeper read any queued message as a backlog the step might be waiting in, and held its copy back for eight graces.

Real Redis, a real producer app publishing real Celery messages, and the sweep itself; no worker consumes, so what
the queue holds is exactly what was published (a private Redis: no worker of another module takes or sweeps it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis
from kombu import Exchange, Queue

from orchestrator import Client, Settings
from orchestrator.celery_app import CeleryPublisher, create_app
from orchestrator.engine.priorities import redis_queue_lists
from orchestrator.engine.runtime import Runtime, build_runtime
from orchestrator.engine.sweep import SENT_CLOCK_MARGIN_S, sweep_once
from orchestrator.state import keys
from tests.conftest import private_redis as start_private_redis
from tests.integration.helpers import wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

GRACE_S = SENT_CLOCK_MARGIN_S + 0.5
SPEC = workflow("lost_message", {"name": "a", "uses": "noop"})


@pytest.fixture
def settings() -> Iterator[Settings]:
    with start_private_redis() as server:
        yield Settings.from_env({"REDIS_URL": server.url, "ORCH_QUEUED_GRACE_S": str(GRACE_S)})


@pytest.fixture
def client(settings: Settings) -> Client:
    return Client(settings)


@pytest.fixture
def runtime(settings: Settings) -> Runtime:
    return build_runtime(settings, CeleryPublisher(create_app(settings), settings))


def messages_for(raw: redis.Redis, queue: str, run_id: str) -> list[str]:
    """Task ids of the messages for ``run_id`` waiting in ``queue`` (any of its priority lists)."""
    found = [json.loads(m)["headers"] for name in redis_queue_lists(queue) for m in raw.lrange(name, 0, -1)]
    return [h["id"] for h in found if run_id in h.get("argsrepr", "")]


def sweep_when_due(runtime: Runtime, raw: redis.Redis, member: str) -> None:
    """Wait for the dispatch hold ``member`` to fall due, then sweep once (a fresh owner: the lock is free)."""
    wait_for(lambda: member in runtime.store.expired_leases(), timeout=GRACE_S + 10, what="the hold to fall due")
    raw.delete(keys.SWEEPER_LOCK)
    sweep_once(runtime, owner=f"test-{time.monotonic()}")


def held(raw: redis.Redis, run_id: str) -> str:
    """The root's dispatch hold in the lease index."""
    (member,) = [m.decode() for m in raw.zrange(keys.LEASES, 0, -1) if m.decode().startswith(f"{run_id}|a|")]
    return member


def test_a_message_lost_while_other_messages_flow_through_the_queue_is_sent_again_after_one_grace(
    client: Client, runtime: Runtime, settings: Settings
) -> None:
    raw = redis.Redis.from_url(settings.redis_url)
    lost_run = client.submit(SPEC, {})
    member = held(raw, lost_run)
    # A worker took the message and was killed before claiming the step: the message is gone from the queue.
    assert [raw.rpop(name) for name in redis_queue_lists(settings.cpu_queue) if raw.llen(name)] != []
    wait_for(lambda: member in runtime.store.expired_leases(), timeout=GRACE_S + 10, what="the hold to fall due")
    # Meanwhile other runs keep the queue busy: a message sent since, well after the lost step was queued.
    busy_run = client.submit(SPEC, {})

    sweep_when_due(runtime, raw, member)

    assert messages_for(raw, settings.cpu_queue, lost_run) == [keys.parse_lease_member(member)[2]]
    assert messages_for(raw, settings.cpu_queue, busy_run) != []
    resent = [e for e in client.store.events(lost_run) if e.type == "step_queued" and (e.data or {}).get("resent")]
    assert len(resent) == 1


def test_a_step_still_waiting_behind_an_older_backlog_is_not_sent_twice(
    client: Client, runtime: Runtime, settings: Settings
) -> None:
    raw = redis.Redis.from_url(settings.redis_url)
    client.submit(SPEC, {})  # an older message ahead of it: a backlog no worker has reached yet
    waiting_run = client.submit(SPEC, {})
    member = held(raw, waiting_run)

    sweep_when_due(runtime, raw, member)

    assert len(messages_for(raw, settings.cpu_queue, waiting_run)) == 1
    assert client.store.run_fields(waiting_run)[keys.step_field("a", "lease")]
    assert member not in runtime.store.expired_leases(), "its hold was extended, not resent"
    assert not [e for e in client.store.events(waiting_run) if (e.data or {}).get("resent")]


def test_a_message_taken_and_not_acknowledged_has_no_copy_in_redis_and_goes_back_to_its_queue_on_close(
    settings: Settings, unique: str
) -> None:
    # Our broker settings (ORCH_BROKER_UNACKED_INDEX off): kombu keeps a taken message in memory only, and a worker
    # that stops or loses its connection hands it back; a SIGKILLed one leaves it to the lease index.
    app = create_app(settings)
    redis_client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    queue = Queue(f"probe_{unique}", Exchange(f"probe_{unique}"), f"probe_{unique}")
    taken: list[object] = []
    with app.connection_for_write() as connection:
        with connection.Producer() as producer:
            producer.publish({"step": unique}, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue])
        with connection.Consumer(queue, callbacks=[lambda _body, message: taken.append(message)]):
            connection.drain_events(timeout=10)

        assert len(taken) == 1
        assert redis_client.llen(queue.name) == 0
        assert not any(unique in value for value in redis_client.hvals("unacked")), "no copy in kombu's unacked hash"

    assert redis_client.llen(queue.name) == 1, "handed back when the connection closed"
    assert unique in redis_client.lindex(queue.name, 0)
