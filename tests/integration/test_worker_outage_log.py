"""A worker whose state store goes away says so once, and once more when it is back: no traceback at every sweep."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from orchestrator import Client, Settings
from orchestrator.dev.local_workers import LocalWorkers
from tests.conftest import WORKER_ENV, private_redis
from tests.integration.helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SWEEP_INTERVAL_S = 0.2
# How long the state store stays down: the outage under test, some ten sweeps long (not a synchronisation).
OUTAGE_S = 2.0


def test_a_state_store_outage_is_one_warning_when_it_starts_and_one_info_line_when_it_ends(tmp_path: Path) -> None:
    with private_redis() as broker, private_redis() as state:
        env = {
            **WORKER_ENV,
            "REDIS_URL": state.url,
            "ORCH_BROKER_URL": broker.url,
            "ORCH_SWEEP_INTERVAL_S": str(SWEEP_INTERVAL_S),
            "ORCH_LOG_FORMAT": "text",
        }
        client = Client(Settings.from_env(env))
        with LocalWorkers(client.app, count=1, env=env, log_dir=tmp_path) as pool:
            log = tmp_path / f"{next(iter(pool.processes)).split('@', maxsplit=1)[0]}.log"

            def text() -> str:
                return log.read_text(errors="replace")

            state.stop()
            wait_for(lambda: "sweep: Redis does not answer" in text(), timeout=30, what="the outage warning")
            down_since = time.monotonic()
            while time.monotonic() - down_since < OUTAGE_S:
                assert pool.processes[next(iter(pool.processes))].poll() is None
                time.sleep(SWEEP_INTERVAL_S)
            state.restart()
            back = wait_for(
                lambda: re.search(r"INFO .*sweep: Redis answers again after an outage of (\d+\.\d)s", text()),
                timeout=30,
                what="the line saying Redis is back",
            )

    during = text()
    assert during.count("Redis does not answer") == 1, during
    assert "Traceback" not in during, during
    assert "sweep failed" not in during, during
    assert re.search(r"WARNING .*sweep: Redis does not answer \(ConnectionError: ", during), during
    assert float(back.group(1)) >= OUTAGE_S
