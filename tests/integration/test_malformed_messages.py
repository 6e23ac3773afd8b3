"""Malformed and foreign messages on the step queues: logged, acknowledged once, and harmless.

Anyone who can write to the broker can put anything on the ``llm`` and ``cpu`` queues: a step message with the wrong
arguments, one for a run or definition that does not exist, a stale copy from an earlier generation, a task this
worker does not know, or bytes that are not a Celery message at all. Each must be logged with its reason, removed
from the broker (not retried, not redelivered), and must change no run. The worker keeps serving.

The module has its own Redis and its own worker, so the log it reads and the broker it inspects hold only its messages.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Producer

from orchestrator import Client, Settings
from orchestrator.celery_app import STEP_TASK
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.dev.redis_server import RedisServer
from orchestrator.state import keys
from tests.conftest import WORKER_ENV, private_redis
from tests.integration.helpers import held_by_workers, py, queue_length, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WARNING_OR_WORSE = {"WARNING", "ERROR", "CRITICAL"}


@dataclass
class Setup:
    server: RedisServer
    client: Client
    workers: LocalWorkers
    log: Path
    raw: redis.Redis


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A private Redis, a client, and one worker (two prefork slots) logging JSON lines to a file."""
    with private_redis() as server:
        yield from _with_worker(server, tmp_path_factory)


def _with_worker(server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    log_dir = tmp_path_factory.mktemp("malformed-logs")
    client = Client(Settings.from_env({"REDIS_URL": server.url, **WORKER_ENV}))
    env = {"REDIS_URL": server.url, **WORKER_ENV, "ORCH_LOG_FORMAT": "json"}
    workers = LocalWorkers(client.app, count=1, concurrency=2, env=env, log_dir=log_dir)
    try:
        workers.start()
        (log,) = log_dir.glob("w1-*.log")
        yield Setup(server, client, workers, log, redis.Redis.from_url(server.url, decode_responses=True))
    finally:
        workers.stop()


def _records(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written as we read
    return out


def _logged(setup: Setup, marker: str, levels: set[str], saying: str = "") -> list[dict[str, Any]]:
    """Log records at ``levels`` that mention ``marker`` (a task id or a string inside the message) and ``saying``."""
    return [
        r
        for r in _records(setup.log)
        if r.get("level") in levels and marker in (line := json.dumps(r)) and saying in line
    ]


def _in_broker(setup: Setup, marker: str) -> bool:
    """Whether any queued message, or one a worker took and has not acknowledged, mentions ``marker``."""
    raw = setup.raw
    messages = raw.lrange("llm", 0, -1) + raw.lrange("cpu", 0, -1)
    return any(marker in message for message in messages) or held_by_workers(setup.client.app, marker)


def _received(setup: Setup, task_id: str) -> int:
    """How many times the worker received the task message with this id."""
    return sum(1 for r in _records(setup.log) if "received" in str(r.get("message", "")) and task_id in str(r))


def _pool(setup: Setup) -> tuple[int | None, list[int]]:
    (name,) = setup.workers.processes
    process = setup.workers.processes[name]
    return (process.pid if process.poll() is None else None), sorted(setup.workers.pool_children(name))


def _send_step(setup: Setup, queue: str, args: Any, kwargs: Any | None = None) -> str:
    task_id = uuid.uuid4().hex
    setup.client.app.send_task(STEP_TASK, args=args, kwargs=kwargs or {}, queue=queue, task_id=task_id)
    return task_id


def _publish_raw(
    setup: Setup,
    queue: str,
    body: Any,
    *,
    headers: dict[str, Any] | None = None,
    content_type: str = "application/json",
    serializer: str | None = None,
) -> None:
    """Publish straight through kombu, bypassing Celery's protocol."""
    with Connection(setup.server.url) as connection:
        producer = Producer(connection.default_channel, exchange=Exchange(queue, type="direct"), routing_key=queue)
        if serializer is None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            producer.publish(
                data, headers=headers or {}, content_type=content_type, content_encoding="utf-8", declare=[]
            )
        else:
            producer.publish(body, headers=headers or {}, serializer=serializer, declare=[])


def _assert_handled_once(
    setup: Setup, marker: str, *, levels: set[str] = WARNING_OR_WORSE, saying: str = ""
) -> list[dict[str, Any]]:
    records = wait_for(lambda: _logged(setup, marker, levels, saying), timeout=30, what=f"the worker to log {marker}")
    wait_for(lambda: not _in_broker(setup, marker), timeout=30, what=f"{marker} to leave the broker")
    return records


@pytest.fixture(scope="module")
def finished_run(setup: Setup) -> dict[str, Any]:
    """A run that succeeded, so messages can name a real run id and definition hash."""
    run_id = setup.client.submit(workflow("malformed_target", py("draft", "tests.count_calls")))
    view = setup.client.wait(run_id, timeout=60)
    assert view["status"] == "succeeded"
    return view


@pytest.mark.parametrize(
    ("case", "queue", "reason"),
    [
        ("no arguments", "llm", "missing arguments"),
        ("missing arguments", "cpu", "missing arguments"),
        ("one argument too many", "llm", "6 positional arguments"),
        ("an item index that is no number", "cpu", "index must be decimal digits"),
        ("an unexpected keyword argument", "cpu", "unexpected keyword arguments"),
        ("an argument given twice", "llm", "arguments given twice"),
        ("wrong types", "llm", "must be a non-empty string"),
        ("an empty string", "cpu", "must be a non-empty string"),
        ("an unknown definition hash", "cpu", "no definition"),
        ("an unknown step", "llm", "has no step"),
    ],
)
def test_a_malformed_step_message_is_logged_with_its_reason_and_acked_once(
    setup: Setup, finished_run: dict[str, Any], case: str, queue: str, reason: str
) -> None:
    run_id, def_hash = finished_run["run_id"], finished_run["definition_hash"]
    args, kwargs = {
        "no arguments": ([], {}),
        "missing arguments": ([run_id], {}),
        "one argument too many": ([run_id, def_hash, "draft", "1", "0", "surplus"], {}),
        "an item index that is no number": ([run_id, def_hash, "draft", "1", "surplus"], {}),
        "an unexpected keyword argument": ([run_id, def_hash, "draft", "1"], {"priority": "high"}),
        "an argument given twice": ([run_id, def_hash, "draft", "1"], {"step": "draft"}),
        "wrong types": ([123, ["not", "a", "hash"], {"step": 1}, None], {}),
        "an empty string": ([run_id, def_hash, "", "1"], {}),
        "an unknown definition hash": ([run_id, "0" * 64, "draft", "1"], {}),
        "an unknown step": ([run_id, def_hash, "no_such_step", "1"], {}),
    }[case]
    before = setup.raw.hgetall(keys.run_key(run_id))
    main_pid, _ = _pool(setup)

    task_id = _send_step(setup, queue, args, kwargs)

    _assert_handled_once(setup, task_id, saying=reason)
    assert _pool(setup)[0] == main_pid, "the worker's main process survived"
    assert setup.raw.hgetall(keys.run_key(run_id)) == before, "the run named in the message is unchanged"
    assert _received(setup, task_id) == 1


def test_messages_for_an_unknown_run_or_a_stale_generation_change_no_run(setup: Setup, unique: str) -> None:
    review = {"name": "review", "uses": "approval", "depends_on": ["draft"], "with": {"approvers": ["alice"]}}
    spec = workflow(
        f"malformed_waiting_{unique}",
        py("draft", "tests.count_calls"),
        review,
        py("publish", "tests.count_calls", "review"),
    )
    run_id = setup.client.submit(spec)
    wait_for(lambda: setup.client.status(run_id)["steps"]["review"]["status"] == "waiting", what="the review to wait")
    def_hash = setup.client.status(run_id)["definition_hash"]
    before = setup.raw.hgetall(keys.run_key(run_id))
    events_before = setup.raw.xlen(keys.events_key(run_id))

    unknown_run = _send_step(setup, "cpu", [uuid.uuid4().hex, def_hash, "draft", "1"])
    stale = [
        _send_step(setup, "cpu", [run_id, def_hash, step, generation])
        for step in ("draft", "review", "publish")
        for generation in ("0", "2")
    ]
    sent = [unknown_run, *stale]

    _assert_handled_once(setup, unknown_run, levels={"INFO", *WARNING_OR_WORSE}, saying="dropped: missing")
    for task_id in stale:
        _assert_handled_once(setup, task_id, levels={"INFO", *WARNING_OR_WORSE}, saying="dropped: stale")
    assert setup.raw.hgetall(keys.run_key(run_id)) == before, "the in-flight run's hash is unchanged"
    assert setup.raw.xlen(keys.events_key(run_id)) == events_before, "no event was added to its stream"
    assert not any(m.startswith(f"{run_id}|") for m in setup.raw.zrange(keys.LEASES, 0, -1))
    setup.client.approve(run_id, "review", by="alice")
    view = setup.client.wait(run_id, timeout=60)
    assert view["status"] == "succeeded"
    assert view["steps"]["draft"]["output"]["calls"] == 1, "the finished step did not run again"
    assert [_received(setup, task_id) for task_id in sent] == [1] * len(sent)


def test_a_task_this_worker_does_not_know_is_discarded(setup: Setup) -> None:
    task_id = uuid.uuid4().hex
    setup.client.app.send_task("someone_else.send_newsletter", args=["to-everyone"], queue="llm", task_id=task_id)

    records = _assert_handled_once(setup, task_id)

    assert any("unregistered task" in r["message"] for r in records)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("not celery's protocol", "unknown message"),
        ("a body that is not [args, kwargs, embed]", "malformed step message"),
        ("invalid JSON", "decode message body"),
        ("pickle", "untrusted content"),
    ],
)
def test_bytes_that_are_not_a_valid_step_message_are_discarded(setup: Setup, case: str, reason: str) -> None:
    marker = f"marker-{uuid.uuid4().hex}"
    task_headers = {"task": STEP_TASK, "id": marker, "lang": "py", "argsrepr": "", "kwargsrepr": ""}
    main_pid, _ = _pool(setup)
    if case == "not celery's protocol":
        _publish_raw(setup, "cpu", {"hello": marker})
    elif case == "a body that is not [args, kwargs, embed]":
        _publish_raw(setup, "llm", {"args": marker}, headers=task_headers)
    elif case == "invalid JSON":
        _publish_raw(setup, "cpu", f'{{"not json": {marker}'.encode(), headers=task_headers)
    else:
        _publish_raw(setup, "cpu", [[marker], {}, {}], headers=task_headers, serializer="pickle")

    _assert_handled_once(setup, marker, saying=reason)
    assert _pool(setup)[0] == main_pid, "the worker's main process survived"


def test_a_message_whose_embed_is_not_a_mapping_is_acked_though_celery_cannot_log_its_id(setup: Setup) -> None:
    # Celery's own request code fails on such a message before any of ours runs, in the pool and again in the main
    # process's callback; it has already acknowledged it by then, and its log line is Celery's, without the id.
    marker = f"marker-{uuid.uuid4().hex}"
    headers = {"task": STEP_TASK, "id": marker, "lang": "py", "argsrepr": "", "kwargsrepr": ""}
    main_pid, _ = _pool(setup)

    _publish_raw(setup, "llm", [[marker, "hash", "step", "1"], {}, "not a mapping"], headers=headers)

    wait_for(lambda: _received(setup, marker) == 1, what="the worker to receive it")
    wait_for(lambda: not _in_broker(setup, marker), what="it to leave the broker")
    wait_for(lambda: "Pool callback raised exception" in setup.log.read_text(errors="replace"), what="Celery's error")
    assert _pool(setup)[0] == main_pid, "the worker's main process survived"


def test_after_all_of_that_the_worker_still_has_its_pool_and_runs_steps(
    setup: Setup, finished_run: dict[str, Any], unique: str
) -> None:
    main_pid, children = _pool(setup)
    assert main_pid is not None
    assert len(children) == setup.workers.concurrency, "the pool is complete (same processes, or replacements)"
    assert setup.client.app.control.ping(destination=list(setup.workers.processes), timeout=5)

    run_id = setup.client.submit(
        workflow(f"malformed_after_{unique}", py("a", "tests.count_calls"), py("b", "tests.count_calls", "a"))
    )
    view = setup.client.wait(run_id, timeout=60)

    assert view["status"] == "succeeded"
    assert view["steps"]["b"]["output"]["calls"] == 1
    assert queue_length(setup.raw, "llm") == queue_length(setup.raw, "cpu") == 0
    wait_for(lambda: not held_by_workers(setup.client.app), what="every message taken to be acknowledged")
