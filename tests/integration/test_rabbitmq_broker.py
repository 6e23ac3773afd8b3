"""RabbitMQ as the broker, Redis for state: ``ORCH_BROKER_URL=amqp://…`` with ``REDIS_URL`` as before.

Real worker processes consume queues of their own on the RabbitMQ at ``ORCH_TEST_RABBITMQ_URL`` (default
``amqp://guest:guest@127.0.0.1:5672//``), named uniquely per module run and deleted at its end, so nothing else on
that broker is touched. State lives on a Redis database of its own. Without a reachable RabbitMQ the module is skipped,
except under ``CI=true``, where it fails.

What differs from the Redis broker, and is checked here: the publisher declares a queue no worker has declared yet
(``task_create_missing_queues``; RabbitMQ would drop an unroutable message); delayed retries are held unacknowledged
by a worker until their ETA, and RabbitMQ hands them back the moment that worker dies, where Redis waits for the
visibility timeout; a whole worker killed mid-step is recovered by the lease sweeper, its redelivered message dropped.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import amqp.exceptions
import pytest
import redis
from kombu import Connection

from orchestrator import Client, Settings
from orchestrator.dev.local_workers import LocalWorkers
from tests.conftest import ARTIFACTS, IN_CI, WORKER_ENV
from tests.integration.helpers import llm, py, ts, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

RABBITMQ_URL = os.environ.get("ORCH_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
DATABASE = 10
LOG_DIR = ARTIFACTS / "worker-logs"


class Broker:
    """The test's view of RabbitMQ: how many messages a queue holds, and the queues to delete at the end."""

    def __init__(self, connection: Connection, tag: str) -> None:
        self.connection = connection
        self.tag = tag
        self.created: list[str] = []

    def queue(self, purpose: str) -> str:
        """A queue name unique to this module run, deleted at its end."""
        name = f"orch-test-{purpose}-{self.tag}"
        self.created.append(name)
        return name

    def ready(self, queue: str) -> int | None:
        """Messages waiting in ``queue`` (not those a worker holds unacknowledged); ``None`` if it does not exist."""
        channel = self.connection.channel()
        try:
            _, count, _ = channel.queue_declare(queue=queue, passive=True)
        except amqp.exceptions.NotFound:
            return None  # a failed passive declare closes the channel on the server side
        channel.close()
        return int(count)

    def delete_created(self) -> None:
        channel = self.connection.channel()
        for name in self.created:
            # Celery declares a direct exchange of the same name for each queue it creates.
            channel.queue_delete(name)
            channel.exchange_delete(name)
        channel.close()


class BrokerLink:
    """A TCP relay between workers and RabbitMQ that can cut every connection through it, as a network blip would."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 5672)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = parts._replace(netloc=f"{parts.netloc.rsplit('@', 1)[0]}@127.0.0.1:{self.port}").geturl()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.accepted = 0
        threading.Thread(target=self._accept, name="broker-link", daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._server.getsockname()[1])

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
                self.accepted += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(source)
            self._drop(sink)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            if sock not in self._sockets:
                return
            self._sockets.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def cut(self) -> int:
        """Close every connection through the link (new ones are still accepted); returns how many there were."""
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            self._drop(sock)
        return len(open_sockets) // 2

    def close(self) -> None:
        self._server.close()
        self.cut()


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    connection = Connection(RABBITMQ_URL, connect_timeout=3)
    try:
        connection.ensure_connection(max_retries=1)
    except Exception as exc:
        reason = f"RabbitMQ at {urlsplit(RABBITMQ_URL).hostname}:{urlsplit(RABBITMQ_URL).port} does not answer: {exc}"
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: the RabbitMQ broker tests must run)")
        pytest.skip(reason)
    found = Broker(connection, uuid.uuid4().hex[:8])
    try:
        yield found
    finally:
        found.delete_created()
        connection.release()


@pytest.fixture(scope="module")
def env(redis_url: str, broker: Broker) -> dict[str, str]:
    state_url = urlsplit(redis_url)._replace(path=f"/{DATABASE}").geturl()
    redis.Redis.from_url(state_url).flushdb()
    return {
        **WORKER_ENV,
        "REDIS_URL": state_url,
        "ORCH_BROKER_URL": RABBITMQ_URL,
        "ORCH_LLM_QUEUE": broker.queue("llm"),
        "ORCH_CPU_QUEUE": broker.queue("cpu"),
    }


@pytest.fixture(scope="module")
def client(env: dict[str, str]) -> Iterator[Client]:
    found = Client(Settings.from_env(env))
    assert found.app.conf.broker_url == RABBITMQ_URL
    yield found
    found.app.close()


@pytest.fixture(scope="module")
def state(env: dict[str, str]) -> redis.Redis:
    return redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)


def _pool(client: Client, env: dict[str, str], queues: tuple[str, ...], **options: object) -> LocalWorkers:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    return LocalWorkers(client.app, env=env, queues=queues, log_dir=LOG_DIR, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def workers(client: Client, env: dict[str, str]) -> Iterator[tuple[LocalWorkers, LocalWorkers]]:
    """The compose split: LLM steps on a threads pool, the rest on prefork, one worker each."""
    llm_pool = _pool(client, env, (env["ORCH_LLM_QUEUE"],), count=1, pool="threads", concurrency=8)
    cpu_pool = _pool(client, env, (env["ORCH_CPU_QUEUE"],), count=1, pool="prefork", concurrency=2)
    try:
        for pool in (llm_pool, cpu_pool):
            pool.start_one()
        for pool in (llm_pool, cpu_pool):
            pool.wait_ready(list(pool.processes))
        yield llm_pool, cpu_pool
    finally:
        llm_pool.stop()
        cpu_pool.stop()


def _first_pid(state: redis.Redis, run_id: str, step: str) -> int:
    raw = wait_for(lambda: state.lindex(f"test:pids:{run_id}:{step}", 0), what=f"{step} to start")
    return int(str(raw).split(":")[0])


def test_a_fan_out_with_a_retried_llm_step_runs_through_rabbitmq_with_state_in_redis(
    client: Client,
    workers: tuple[LocalWorkers, LocalWorkers],
    broker: Broker,
    env: dict[str, str],
    state: redis.Redis,
) -> None:
    spec = workflow(
        f"rabbit_fan_out_{broker.tag}",
        py("start", "tests.count_calls"),
        llm(
            "flaky",
            "start",
            errors=("rate_limit",),
            retry_after_s=1.0,
            retry={"max_attempts": 3, "backoff_s": 0.1, "backoff_max_s": 0.2},
        ),
        llm("draft", "start", latency=1.0),
        # Longer than draft: started at once in the finishing slot (it continues locally), it must still be running
        # when draft, sent through RabbitMQ to the other worker, starts.
        py("crunch", "tests.sleep", "start", seconds=2.0),
        py("join", "tests.count_calls", "flaky", "draft", "crunch"),
    )
    view = client.wait(client.submit(spec), timeout=60)

    steps = view["steps"]
    assert view["status"] == "succeeded", view
    assert {name: step["status"] for name, step in steps.items()} == dict.fromkeys(steps, "succeeded")
    flaky = steps["flaky"]
    assert flaky["attempts"] == 2
    assert [(e["type"], e["status"], e["attempt"]) for e in flaky["errors"]] == [("rate_limit", 429, 1)]
    assert flaky["errors"][0]["retry_after"] == 1.0
    # The countdown travelled as an ETA through RabbitMQ and was honoured, never shorter than retry-after.
    assert ts(flaky["finished_at"]) - ts(flaky["started_at"]) >= 1.0
    # The branches overlapped: an LLM step on the threads worker and a python step on the prefork worker.
    branches = [steps["draft"], steps["crunch"]]
    assert max(ts(s["started_at"]) for s in branches) < min(ts(s["finished_at"]) for s in branches)
    assert steps["join"]["output"] == {"calls": 1, "upstream": ["crunch", "draft", "flaky", "start"]}
    # The messages went through RabbitMQ's queues, none through Redis lists of those names.
    for queue in (env["ORCH_LLM_QUEUE"], env["ORCH_CPU_QUEUE"]):
        assert broker.ready(queue) == 0
        assert not state.exists(queue)


def test_killing_a_whole_worker_mid_step_reruns_the_step_on_another_worker(
    client: Client, broker: Broker, env: dict[str, str], state: redis.Redis
) -> None:
    queue = broker.queue("kill")
    with _pool(client, env, (queue,), count=2, pool="prefork", concurrency=1) as pool:
        spec = workflow(
            f"rabbit_kill_{broker.tag}",
            py("slow", "tests.report_pid_then_sleep", seconds=2.0, queue=queue),
            py("after", "tests.count_calls", "slow"),
        )
        run_id = client.submit(spec)
        pid = _first_pid(state, run_id, "slow")
        victim = next(name for name in pool.processes if pid in pool.pool_children(name))
        killed_at = time.time()
        pool.kill(victim)

        view = client.wait(run_id, timeout=60)

    slow = view["steps"]["slow"]
    assert view["status"] == "succeeded"
    assert slow["attempts"] == 2
    assert slow["errors"][0]["type"] == "worker_lost"
    assert slow["output"]["pid"] != pid
    assert view["steps"]["after"]["output"]["calls"] == 1
    # RabbitMQ redelivered the killed worker's message at once; the claim dropped it (the attempt's lease was still
    # live), and the sweeper re-sent the step when the 3 s lease ran out: bounded by lease + sweep, not hours.
    assert time.time() - killed_at < 25
    assert state.llen(f"test:pids:{run_id}:slow") == 2


def test_a_delayed_retry_held_by_a_killed_worker_goes_back_to_the_queue_at_once(
    client: Client, broker: Broker, env: dict[str, str]
) -> None:
    queue = broker.queue("eta")
    spec = workflow(
        f"rabbit_eta_{broker.tag}",
        # The retry waits 8 s: long enough that, on a loaded machine, the worker is killed while it still holds it.
        llm(
            "paced",
            errors=("rate_limit",),
            retry_after_s=8.0,
            queue=queue,
            retry={"max_attempts": 3, "backoff_s": 0.1, "backoff_max_s": 0.2},
        ),
    )
    run_id = client.submit(spec)
    # Published before any worker consumed (or declared) the queue: the publisher declared it, so it waits there.
    assert wait_for(lambda: broker.ready(queue) == 1, timeout=10, what="the message to wait in RabbitMQ")

    pool = _pool(client, env, (queue,), count=1, pool="threads", concurrency=4)
    try:
        pool.start()
        (first,) = pool.processes

        def retry_held() -> bool:
            # Celery publishes the retry before it acknowledges the first message: killed in between, the worker would
            # hand both back. The first is acknowledged right after it leaves the worker's active requests.
            inspect = client.app.control.inspect(destination=[first], timeout=1.0)
            if (inspect.active() or {}).get(first, [None]):
                return False
            scheduled = inspect.scheduled() or {}
            return any(entry["request"]["args"][2] == "paced" for entry in scheduled.get(first, []))

        wait_for(retry_held, timeout=30, what="the worker to hold the delayed retry until its ETA")
        assert broker.ready(queue) == 0
        killed_at = time.time()
        pool.kill(first)
        # RabbitMQ takes an unacknowledged message back when its consumer's connection drops.
        wait_for(lambda: broker.ready(queue) == 1, timeout=10, what="RabbitMQ to requeue the held retry")

        second = pool.start_one()
        pool.wait_ready([second])
        view = client.wait(run_id, timeout=60)
    finally:
        pool.stop()

    paced = view["steps"]["paced"]
    assert view["status"] == "succeeded"
    assert paced["attempts"] == 2
    assert [e["type"] for e in paced["errors"]] == ["rate_limit"]
    assert ts(paced["finished_at"]) - ts(paced["started_at"]) >= 8.0
    # Not the sweeper's resend after ORCH_QUEUED_GRACE_S (300 s): the broker itself gave the message back.
    assert time.time() - killed_at < 30


def test_a_worker_that_loses_its_broker_connection_mid_step_finishes_the_step_once(
    client: Client, broker: Broker, env: dict[str, str], state: redis.Redis
) -> None:
    # worker_cancel_long_running_tasks_on_connection_loss is off: the running step goes on while the worker
    # reconnects, and the copy RabbitMQ redelivers (its first channel died unacknowledged) finds the step taken.
    queue = broker.queue("blip")
    link = BrokerLink(RABBITMQ_URL)
    pool = _pool(client, {**env, "ORCH_BROKER_URL": link.url}, (queue,), count=1, pool="prefork", concurrency=2)
    try:
        pool.start()
        spec = workflow(
            f"rabbit_blip_{broker.tag}",
            py("slow", "tests.report_pid_then_sleep", seconds=3.0, queue=queue),
            py("after", "tests.count_calls", "slow", queue=queue),
        )
        run_id = client.submit(spec)
        pid = _first_pid(state, run_id, "slow")
        accepted_before = link.accepted
        assert link.cut() > 0

        view = client.wait(run_id, timeout=60)
        reconnected = link.accepted > accepted_before
    finally:
        pool.stop()
        link.close()

    slow = view["steps"]["slow"]
    assert view["status"] == "succeeded"
    assert slow["attempts"] == 1
    assert slow["errors"] == []
    assert slow["output"]["pid"] == pid
    assert state.llen(f"test:pids:{run_id}:slow") == 1
    # "after" runs on the same queue: the worker consumed it over a new connection.
    assert reconnected
    assert view["steps"]["after"]["output"]["calls"] == 1


def test_on_priority_queues_a_backlog_is_taken_higher_priority_first(broker: Broker, env: dict[str, str]) -> None:
    # RabbitMQ takes higher priorities first, the reverse of Redis, and only on a queue declared with x-max-priority:
    # the publisher declares this fresh queue so (ORCH_RABBITMQ_PRIORITY_QUEUES) before any worker consumes it. The
    # whole backlog is queued before the worker starts: a child published by a step could race the step's ack here,
    # since RabbitMQ does not order a publish and an ack sent on two connections.
    queue = broker.queue("prio")
    prio_env = {**env, "ORCH_CPU_QUEUE": queue, "ORCH_PRIORITIES": "depth", "ORCH_RABBITMQ_PRIORITY_QUEUES": "true"}
    prio_client = Client(Settings.from_env(prio_env))
    spec = workflow(
        f"rabbit_prio_{broker.tag}", {"name": "low", "uses": "noop"}, {"name": "high", "uses": "noop", "priority": 3}
    )
    try:
        run_ids = [prio_client.submit(spec) for _ in range(3)]
        assert wait_for(lambda: broker.ready(queue) == 6, what="the six roots to wait in the queue")
        with _pool(prio_client, prio_env, (queue,), count=1, pool="prefork", concurrency=1):
            views = [prio_client.wait(run_id, timeout=60) for run_id in run_ids]
    finally:
        prio_client.app.close()

    assert [v["status"] for v in views] == ["succeeded"] * 3
    started = sorted((ts(v["steps"][s]["started_at"]), s) for v in views for s in ("low", "high"))
    assert [s for _, s in started] == ["high"] * 3 + ["low"] * 3
