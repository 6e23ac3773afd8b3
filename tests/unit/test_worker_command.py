"""``orchestrator worker``: it becomes ``celery -A workers worker``, so every pool Celery knows works."""

from __future__ import annotations

import sys

import pytest

from orchestrator.cli import worker_argv
from orchestrator.infra.settings import Settings

SETTINGS = Settings.from_env({})


@pytest.mark.parametrize("pool", ["threads", "gevent", "eventlet", "prefork"])
def test_the_worker_command_hands_every_pool_to_celerys_own_command(pool: str) -> None:
    argv = worker_argv(["-P", pool, "-c", "100"], SETTINGS)

    assert argv[:6] == [sys.executable, "-m", "celery", "-A", "workers", "worker"]
    assert argv[6:10] == ["-P", pool, "-c", "100"]


def test_without_queues_the_worker_consumes_both_step_queues() -> None:
    argv = worker_argv(["-c", "8"], SETTINGS)

    assert argv[-2:] == ["--queues", f"{SETTINGS.llm_queue},{SETTINGS.cpu_queue}"]


@pytest.mark.parametrize("spelling", [["-Q", "llm"], ["--queues", "llm"], ["--queues=llm"], ["-Qllm"]])
def test_queues_the_user_names_are_kept_as_they_are(spelling: list[str]) -> None:
    assert worker_argv(spelling, SETTINGS)[6:] == spelling
