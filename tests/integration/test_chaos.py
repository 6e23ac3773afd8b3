"""Short chaos sessions (``scripts.chaos``): runs succeed and record each output once while workers, and Redis, are
SIGKILLed.

Its own Redis and its own workers: they import the session's step functions (``ORCH_IMPORTS=scripts.steps.chaos``),
which the suite's workers do not.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.conftest import ARTIFACTS
from tests.conftest import private_redis as start_private_redis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def chaos() -> ModuleType:
    """``scripts.chaos``, which registers the session's step functions in this process too."""
    from scripts import chaos

    return chaos


@pytest.fixture
def private_redis() -> Iterator[str]:
    with start_private_redis() as server:
        yield server.url


def test_runs_succeed_and_record_each_output_once_while_workers_are_sigkilled(
    chaos: ModuleType, private_redis: str
) -> None:
    log_dir = ARTIFACTS / "chaos-worker-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    config = chaos.ChaosConfig(
        runs=40, workers=3, concurrency=2, kill_every=1.5, parallel=10, stall_timeout=45, log_dir=log_dir
    )

    report = chaos.run_chaos(config, private_redis)

    # Each kill waits for its replacement to be ready, so a loaded machine (a replacement can take a minute to start)
    # may fit only one kill into the session; what matters is that kills cut steps off mid-flight and those steps
    # ran again.
    assert report.kills >= 1, "workers were really killed while runs were in flight"
    assert report.steps_rerun >= 1, "a killed worker's step ran again elsewhere"
    assert report.problems() == []
    assert report.succeeded == report.runs == 40
    assert report.duplicate_successes == report.missing_successes == []
    assert report.distinct_paid_requests == report.needed_calls == 40 * len(chaos.LLM_STEPS)
    assert report.extra_paid_calls <= report.in_flight_bound


def test_runs_succeed_and_record_each_output_once_while_redis_and_workers_are_sigkilled(chaos: ModuleType) -> None:
    log_dir = ARTIFACTS / "chaos-redis-worker-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    config = chaos.ChaosConfig(
        runs=30,
        workers=3,
        concurrency=2,
        kill_every=4.0,
        parallel=10,
        stall_timeout=45,
        redis_kill_every=4.0,
        redis_down_s=1.0,
        log_dir=log_dir,
    )

    with start_private_redis(appendonly=True, appendfsync="always") as server:
        report = chaos.run_chaos(config, server.url, server=server)

    assert report.redis_kills >= 2, "Redis was really killed while runs were in flight"
    assert report.problems() == []
    assert report.succeeded == report.runs == 30
    assert report.duplicate_successes == report.missing_successes == []
    assert report.distinct_paid_requests == report.needed_calls == 30 * len(chaos.LLM_STEPS)
    assert report.extra_paid_calls <= report.in_flight_bound
