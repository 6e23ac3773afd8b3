"""Logs of a real run that handled secrets: JSON lines, attempt fields on step records, and no secret anywhere.

Real worker processes call a local fake of the Anthropic Messages API with a secret API key; its first answer is a
500 whose message echoes the key, so the retry gets logged with it. A step logs every secret it can see on purpose.
The API is the ``orchestrator api`` command with bearer tokens, used for every request. Redis is reached as an ACL
user with a password, on a database of this module's own.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from orchestrator import Client, Settings
from orchestrator.dev.local_workers import REPO_ROOT, LocalWorkers
from tests.conftest import WORKER_ENV
from tests.fake_anthropic import FakeAnthropicServer, FakeReply, error_body, fake_anthropic_server
from tests.integration.helpers import py, wait_for, workflow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DATABASE = 12
SECRET = uuid.uuid4().hex[:12]
API_KEY = f"sk-ant-test-SECRET-{SECRET}"
TOKEN = f"bearer-token-{SECRET}"
WRONG_TOKEN = f"wrong-token-{SECRET}"
PASSWORD = f"redis-pw-{SECRET}"
ACL_USER = f"orch-logs-{SECRET}"
SECRETS = (API_KEY, TOKEN, WRONG_TOKEN, PASSWORD)
CELERY_TEXT_LINE = ("[20", "[19")  # Celery's own format starts "[2024-01-01 12:00:00,000: INFO/…]"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def secret_redis_url(redis_url: str) -> Iterator[str]:
    """This module's database, reached as an ACL user whose password must never be logged."""
    admin = redis.Redis.from_url(redis_url)
    admin.acl_setuser(
        ACL_USER, enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], channels=["*"], commands=["+@all"]
    )
    parts = urlsplit(redis_url)
    url = parts._replace(netloc=f"{ACL_USER}:{PASSWORD}@{parts.hostname}:{parts.port}", path=f"/{DATABASE}").geturl()
    redis.Redis.from_url(url).flushdb()
    try:
        yield url
    finally:
        admin.acl_deluser(ACL_USER)


@pytest.fixture(scope="module")
def anthropic() -> Iterator[FakeAnthropicServer]:
    with fake_anthropic_server() as server:
        server.queue(FakeReply(status=500, body=error_body("api_error", f"upstream failed for key {API_KEY}")))
        yield server


@pytest.fixture(scope="module")
def env(secret_redis_url: str, anthropic: FakeAnthropicServer) -> dict[str, str]:
    return {
        **WORKER_ENV,
        "REDIS_URL": secret_redis_url,
        "ANTHROPIC_API_KEY": API_KEY,
        "ANTHROPIC_BASE_URL": anthropic.base_url,
        "ORCH_API_TOKENS": json.dumps({TOKEN: {"principal": "ci", "scopes": ["read", "write"]}}),
        "ORCH_LOG_FORMAT": "json",
        "ORCH_LOG_LEVEL": "DEBUG",
    }


@pytest.fixture(scope="module")
def logs(env: dict[str, str], anthropic: FakeAnthropicServer, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Run the workflow through the API, stop everything, and hand back the log files and the run."""
    log_dir = tmp_path_factory.mktemp("logs")
    client = Client(Settings.from_env(env))
    port = free_port()
    api_env = {**{k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "ANTHROPIC_"))}, **env}
    name = f"logs_{SECRET}"
    draft = {
        "name": "draft",
        "uses": "llm",
        "with": {"prompt": "Say hello", "max_tokens": 20},
        "retry": {"max_attempts": 3, "backoff_s": 0.1, "backoff_max_s": 0.2},
    }
    spec = workflow(name, draft, py("leak", "tests.log_secrets", "draft"))
    with LocalWorkers(client.app, count=1, concurrency=2, env=env, log_dir=log_dir) as pool:
        with (log_dir / "api.log").open("wb") as api_log:
            api = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", "api", "--port", str(port)],
                env=api_env,
                cwd=REPO_ROOT,
                stdout=api_log,
                stderr=subprocess.STDOUT,
            )
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
                wait_for(lambda: _healthy(http, api), timeout=30, what="orchestrator api to answer")
                auth = {"Authorization": f"Bearer {TOKEN}"}
                run_id = http.post("/runs", json={"definition": spec}, headers=auth).json()["run_id"]
                view = client.wait(run_id, timeout=60)
                assert http.get(f"/runs/{run_id}", headers=auth).status_code == 200
                assert http.get("/metrics", headers=auth).status_code == 200
                assert http.get("/workflows", headers={"Authorization": f"Bearer {WRONG_TOKEN}"}).status_code == 401
        finally:
            api.terminate()
            api.wait(timeout=15)
        worker_log = log_dir / f"{next(iter(pool.processes)).split('@')[0]}.log"
    return {"view": view, "name": name, "worker": worker_log.read_text(), "api": (log_dir / "api.log").read_text()}


def _healthy(http: httpx.Client, api: subprocess.Popen[bytes]) -> bool:
    assert api.poll() is None, "orchestrator api exited"
    try:
        return http.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


def records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_the_run_really_used_the_secrets(logs: Any, anthropic: FakeAnthropicServer) -> None:
    assert logs["view"]["status"] == "succeeded", logs["view"]["error"]
    # SDK versions send the key as x-api-key or as a bearer token.
    sent = [
        r.headers.get("x-api-key") or r.headers.get("authorization", "").removeprefix("Bearer ")
        for r in anthropic.requests
    ]
    assert sent == [API_KEY, API_KEY], "a 500, then the retry"
    assert logs["view"]["steps"]["draft"]["attempts"] == 2


@pytest.mark.parametrize("process", ["worker", "api"])
def test_no_secret_appears_anywhere_in_the_logs(logs: Any, process: str) -> None:
    text = logs[process]

    assert text.strip()
    for secret in SECRETS:
        assert secret not in text, f"{secret} leaked into the {process} log"


def test_the_worker_logs_json_lines_only_besides_celerys_printed_banner(logs: Any) -> None:
    lines = logs["worker"].splitlines()
    parsed = records(logs["worker"])

    assert len(parsed) > 20
    assert not [line for line in lines if line.startswith(CELERY_TEXT_LINE)], "Celery's own log format is replaced"
    assert {"timestamp", "level", "logger", "message", "pid"} <= set(parsed[0])
    assert any(r["logger"].startswith("celery") for r in parsed), "Celery's loggers go through the same handler"


def test_step_records_carry_run_id_step_and_attempt_and_show_where_secrets_were_cut(logs: Any) -> None:
    run_id, parsed = logs["view"]["run_id"], records(logs["worker"])
    retry = [r for r in parsed if r["logger"] == "orchestrator.engine.attempt" and "retrying" in r["message"]]
    leaks = [r for r in parsed if r["logger"] == "tests.workflows"]

    assert len(retry) == 1
    assert {k: retry[0][k] for k in ("run_id", "workflow", "step", "attempt")} == {
        "run_id": run_id,
        "workflow": logs["name"],
        "step": "draft",
        "attempt": 1,
    }
    assert "[REDACTED]" in retry[0]["message"], "the provider's error echoed the key"
    assert len(leaks) == 2
    for record in leaks:
        assert (record["run_id"], record["step"], record["attempt"]) == (run_id, "leak", 1)
        assert "[REDACTED]" in record["message"]
    in_attempts = [r for r in parsed if "run_id" in r]
    assert {r["step"] for r in in_attempts} == {"draft", "leak"}
    assert all(r["run_id"] == run_id and r["attempt"] in (1, 2) for r in in_attempts)


def test_the_api_logs_json_lines_uvicorns_included(logs: Any) -> None:
    lines = [line for line in logs["api"].splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]

    assert parsed
    assert any(r["logger"].startswith("uvicorn") for r in parsed), "uvicorn's loggers go through the same handler"
    assert any("API authentication on" in r["message"] for r in parsed)
