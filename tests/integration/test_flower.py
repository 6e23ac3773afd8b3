"""Flower, run as ``celery -A workers flower`` with basic auth, shows our workers and steps named ``workflow.step``.

Workers send task events (``worker_send_task_events``, ``task_send_sent_event``) and every step is sent with
``shadow="WORKFLOW.STEP"``, which is the name Flower shows. The module uses a Redis database of its own, so Flower
sees only this module's workers and tasks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import Client, Settings
from orchestrator.dev.local_workers import REPO_ROOT, LocalWorkers
from tests.conftest import ARTIFACTS, WORKER_ENV
from tests.integration.helpers import llm, py, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DATABASE = 13
T = TypeVar("T")
AUTH = ("flower-user", "flower-pass-5f1c")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def env(redis_url: str) -> dict[str, str]:
    url = urlsplit(redis_url)._replace(path=f"/{DATABASE}").geturl()
    redis.Redis.from_url(url).flushdb()
    return {"REDIS_URL": url, **WORKER_ENV}


@pytest.fixture(scope="module")
def client(env: dict[str, str]) -> Client:
    return Client(Settings.from_env(env))


@pytest.fixture(scope="module")
def workers(client: Client, env: dict[str, str]) -> Iterator[LocalWorkers]:
    log_dir = ARTIFACTS / "worker-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with LocalWorkers(client.app, count=2, concurrency=1, env=env, log_dir=log_dir) as pool:
        yield pool


@pytest.fixture(scope="module")
def flower(env: dict[str, str], workers: LocalWorkers) -> Iterator[httpx.Client]:
    """Flower on a free loopback port with basic auth; ready once its event receiver sees every worker alive."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers",
        "flower",
        f"--port={port}",
        "--address=127.0.0.1",
        f"--basic-auth={AUTH[0]}:{AUTH[1]}",
    ]
    process_env = {**os.environ, **env, "PYTHONPATH": str(REPO_ROOT)}
    log_dir = ARTIFACTS / "worker-logs"
    with (log_dir / "flower.log").open("ab") as log:
        process = subprocess.Popen(argv, env=process_env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            def workers_alive() -> bool:
                assert process.poll() is None, "flower exited; see test-artifacts/worker-logs/flower.log"
                try:
                    alive = http.get("/api/workers", params={"status": "true"}, auth=AUTH).json()
                except (httpx.TransportError, ValueError):
                    return False
                return all(alive.get(name) for name in workers.processes)

            wait_for(workers_alive, timeout=60, what="Flower to see both workers' heartbeats")
            yield http
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_in_flower(flower: httpx.Client, condition: Callable[[], T], what: str) -> T:
    """``wait_for`` the condition, naming every task Flower shows when it times out."""
    try:
        return wait_for(condition, timeout=30, what=what)
    except AssertionError as exc:
        tasks = flower.get("/api/tasks", auth=AUTH).json()
        shown = [(t.get("name"), t["state"]) for t in tasks.values()]
        raise AssertionError(f"{exc}; Flower shows {shown}") from None


def test_flower_api_needs_credentials_while_healthcheck_and_metrics_stay_open(flower: httpx.Client) -> None:
    assert flower.get("/api/workers").status_code == 401
    assert flower.get("/api/tasks").status_code == 401
    assert flower.get("/api/tasks", auth=(AUTH[0], "wrong")).status_code == 401
    assert flower.get("/healthcheck").status_code == 200
    assert flower.get("/metrics").status_code == 200


def test_flower_lists_our_workers_with_their_queues(flower: httpx.Client, workers: LocalWorkers) -> None:
    listed = flower.get("/api/workers", params={"refresh": "true"}, auth=AUTH).json()

    assert set(workers.processes) <= set(listed)
    for name in workers.processes:
        assert {q["name"] for q in listed[name]["active_queues"]} == {"llm", "cpu"}


def test_flower_shows_each_step_as_workflow_dot_step_succeeded_on_our_workers(
    flower: httpx.Client, client: Client, workers: LocalWorkers, unique: str
) -> None:
    name = f"flower_{unique}"
    spec = workflow(name, llm("outline"), py("count", "tests.sleep", "outline"), llm("summary", "outline", "count"))
    run_id = client.submit(spec)
    assert client.wait(run_id, timeout=60)["status"] == "succeeded"
    expected = {f"{name}.outline", f"{name}.count", f"{name}.summary"}

    def ours() -> dict[str, Any] | None:
        tasks = flower.get("/api/tasks", auth=AUTH).json()
        mine = {t["name"]: t for t in tasks.values() if str(t.get("name", "")).startswith(f"{name}.")}
        # Sent too: the client's message, and those the workers published (their task-sent events buffered with
        # the workers' other task events).
        done = set(mine) == expected and all(t["state"] == "SUCCESS" and t.get("sent") for t in mine.values())
        return mine if done else None

    tasks = wait_in_flower(flower, ours, "Flower to report every step as sent and succeeded")

    assert tasks is not None
    assert set(tasks) == expected
    for task in tasks.values():
        assert task["worker"] in workers.processes
        assert run_id in task["args"], "the step's arguments name its run"


def test_flower_shows_every_step_of_a_fan_out_sent_in_batches_each_under_its_own_task_id(
    flower: httpx.Client, client: Client, workers: LocalWorkers, unique: str
) -> None:
    # Two slots here: a fan-out of 12 is wider than twice that, so it goes out in batches of several steps a message.
    name = f"flower_batch_{unique}"
    width = 12
    spec = workflow(name, py("root", "tests.sleep"), *(py(f"leaf{i}", "tests.sleep", "root") for i in range(width)))
    run_id = client.submit(spec)
    assert client.wait(run_id, timeout=60)["status"] == "succeeded"
    expected = {f"{name}.root", *(f"{name}.leaf{i}" for i in range(width))}

    def ours() -> dict[str, Any] | None:
        tasks = flower.get("/api/tasks", auth=AUTH).json()
        mine = {t["name"]: t for t in tasks.values() if str(t.get("name", "")).startswith(f"{name}.")}
        done = set(mine) == expected and all(t["state"] == "SUCCESS" for t in mine.values())
        return mine if done else None

    tasks = wait_in_flower(flower, ours, "Flower to report every step of the batches as succeeded")

    assert tasks is not None
    assert len({t["uuid"] for t in tasks.values()}) == len(expected), "each step under its own task id"
    assert any("batch" in str(t.get("kwargs")) for t in tasks.values()), "some message carried a batch"
    for task in tasks.values():
        assert task["worker"] in workers.processes


def test_flower_shows_a_step_that_failed_for_good_as_failure_and_a_retried_one_as_success(
    flower: httpx.Client, client: Client, unique: str
) -> None:
    name = f"flower_fail_{unique}"
    spec = workflow(
        name,
        llm("doomed", errors=("bad_request",)),
        # A second's backoff: Flower keeps the last state it heard of a task id, and a retry's next attempt that ended
        # before its first attempt's worker reported the retry (a countdown of milliseconds, a busy worker) would
        # leave it shown as RETRY.
        llm("flaky", errors=("server_error",), retry={"max_attempts": 3, "backoff_s": 1.0, "jitter": False}),
        llm("after", "doomed"),
    )
    run_id = client.submit(spec)
    status = client.wait(run_id, timeout=60)
    assert status["status"] == "failed"
    assert status["steps"]["doomed"]["status"] == "failed"
    assert status["steps"]["doomed"]["error"]["type"] == "bad_request"
    assert status["steps"]["flaky"]["status"] == "succeeded"
    assert status["steps"]["flaky"]["attempts"] == 2
    assert status["steps"]["after"]["status"] == "upstream_failed"
    assert "'doomed'" in status["error"]

    def settled() -> dict[str, list[dict[str, Any]]] | None:
        tasks = flower.get("/api/tasks", auth=AUTH).json()
        mine: dict[str, list[dict[str, Any]]] = {}
        for task in tasks.values():
            if str(task.get("name", "")).startswith(f"{name}."):
                mine.setdefault(task["name"], []).append(task)
        final = {"SUCCESS", "FAILURE"}
        ended = len(mine) == 3 and all(t["state"] in final for ts in mine.values() for t in ts)
        return mine if ended else None

    tasks = wait_in_flower(flower, settled, "Flower to see every step end")

    assert tasks is not None
    [doomed] = tasks[f"{name}.doomed"]
    assert doomed["state"] == "FAILURE"
    assert "StepFailed" in doomed["exception"]
    assert "bad_request" in doomed["exception"]
    # A retry keeps the task id: Flower shows the step's one task as it ended, a success.
    assert [t["state"] for t in tasks[f"{name}.flaky"]] == ["SUCCESS"]
    assert [t["state"] for t in tasks[f"{name}.after"]] == ["SUCCESS"]
    failed = flower.get("/api/tasks", params={"state": "FAILURE"}, auth=AUTH).json()
    assert {t["name"] for t in failed.values() if str(t.get("name", "")).startswith(f"{name}.")} == {f"{name}.doomed"}
    # Flower's own metrics count the failure as a task-failed event.
    events = [
        s
        for family in text_string_to_metric_families(flower.get("/metrics").text)
        for s in family.samples
        if s.name == "flower_events_total" and s.labels.get("task", "").startswith(f"{name}.")
    ]
    failed_events = {s.labels["task"]: s.value for s in events if s.labels["type"] == "task-failed"}
    assert failed_events == {f"{name}.doomed": 1.0}
    # Acknowledged, not redelivered: the step ran once and its record is as the worker left it.
    assert client.status(run_id)["steps"]["doomed"]["attempts"] == 1
