"""``orchestrator sweeper`` on its own: deadlines fire and lost steps are sent again while no worker runs.

The module uses a Redis database of its own, where no worker of another module sweeps, so whatever is swept here was
swept by the sweeper process (its log says so, too).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from orchestrator import Client, Settings
from orchestrator.dev.local_workers import REPO_ROOT, LocalWorkers
from tests.conftest import ARTIFACTS, WORKER_ENV
from tests.integration.helpers import py, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DATABASE = 9
LOG_DIR = ARTIFACTS / "worker-logs"


@pytest.fixture(scope="module")
def env(redis_url: str) -> Iterator[dict[str, str]]:
    url = urlsplit(redis_url)._replace(path=f"/{DATABASE}").geturl()
    redis.Redis.from_url(url).flushdb()
    yield {**WORKER_ENV, "REDIS_URL": url}
    redis.Redis.from_url(url).flushdb()


@pytest.fixture(scope="module")
def client(env: dict[str, str]) -> Client:
    return Client(Settings.from_env(env))


@pytest.fixture(scope="module")
def state(env: dict[str, str]) -> redis.Redis:
    return redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)


class SweeperProcess:
    """``orchestrator sweeper --heartbeat-file …`` as a child process with its log in a file."""

    def __init__(self, env: dict[str, str], directory: Path) -> None:
        self.heartbeat = directory / "sweeper.alive"
        self.log = LOG_DIR / "sweeper.log"
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")
        argv = [sys.executable, "-m", "orchestrator.cli", "sweeper", "--heartbeat-file", str(self.heartbeat)]
        process_env = {**os.environ, **env, "PYTHONPATH": str(REPO_ROOT), "ORCH_LOG_FORMAT": "json"}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(argv, env=process_env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)

    def logged(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def sweeper(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[SweeperProcess]:
    found = SweeperProcess(env, tmp_path_factory.mktemp("sweeper"))
    try:
        wait_for(found.heartbeat.exists, timeout=30, what="the sweeper's first sweep")
        yield found
    finally:
        found.stop()


def test_a_deadline_fires_with_no_worker_running(client: Client, sweeper: SweeperProcess, unique: str) -> None:
    # Nothing consumes this queue: only the sweeper process can end the run.
    spec = workflow(f"deadline_{unique}", py("never", "tests.sleep", queue=f"nobody-{unique}"), timeout_s=1)
    run_id = client.submit(spec)

    view = wait_for(
        lambda: (v := client.status(run_id))["status"] == "timed_out" and v, timeout=20, what="the run to time out"
    )

    assert view["steps"]["never"]["status"] != "succeeded"
    assert sweeper.process.poll() is None


def test_a_step_whose_only_worker_died_is_sent_again_by_the_sweeper(
    client: Client, env: dict[str, str], state: redis.Redis, sweeper: SweeperProcess, unique: str
) -> None:
    queue = f"lost-{unique}"
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    pool = LocalWorkers(client.app, count=1, concurrency=1, queues=(queue,), env=env, log_dir=LOG_DIR)
    try:
        pool.start()
        run_id = client.submit(
            workflow(f"lost_{unique}", py("slow", "tests.report_pid_then_sleep", seconds=2.0, queue=queue))
        )
        wait_for(lambda: state.lindex(f"test:pids:{run_id}:slow", 0), what="the step to start")
        (only,) = pool.processes
        pool.kill(only)

        # No worker is left to sweep: the sweeper process notices the expired lease and queues the step again.
        requeued = wait_for(
            lambda: (s := client.status(run_id)["steps"]["slow"])["status"] == "queued" and s,
            timeout=20,
            what="the lost step to be queued again",
        )
        assert [error["type"] for error in requeued["errors"]] == ["worker_lost"]
        # The step turns queued inside the reclaim script; the sweeper logs once it has sent the step again.
        wait_for(lambda: f"re-dispatched {run_id}/slow" in sweeper.logged(), timeout=10, what="the sweeper's log line")

        second = pool.start_one()
        pool.wait_ready([second])
        view = client.wait(run_id, timeout=30)
    finally:
        pool.stop()

    assert view["status"] == "succeeded"
    assert view["steps"]["slow"]["attempts"] == 2


def test_the_heartbeat_file_is_touched_on_every_sweep_and_sigterm_stops_the_sweeper(sweeper: SweeperProcess) -> None:
    first = sweeper.heartbeat.stat().st_mtime_ns
    wait_for(lambda: sweeper.heartbeat.stat().st_mtime_ns > first, timeout=10, what="a later sweep")

    sweeper.process.send_signal(signal.SIGTERM)

    assert sweeper.process.wait(timeout=10) == 0
    assert "SIGTERM received, stopping" in sweeper.logged()
