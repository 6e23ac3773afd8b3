"""The API under test as its own process, and what is read from it afterwards: its log, profile, and parser."""

from __future__ import annotations

import pstats
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from scripts.harness.report import REPO_ROOT

# What the API logs when streams are in trouble (counted in its log over each window).
LOG_MARKERS = {
    "redis_too_many_connections": "Too many connections",
    "hub_cannot_read": "cannot read its stream",
    "sse_redis_error": "SSE stream of run",
    "redis_error_503": "orchestrator.api.app: Redis error",
    "client_fell_behind": "fell behind and was disconnected",
    "send_timeout": "accepted nothing for",
    "errors": "ERROR:",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ApiProcess:
    """``python -m orchestrator.cli api`` on a random loopback port, in its own session (Ctrl-C reaches us only).

    With ``redis_pool`` it is ``scripts.stream.app`` instead: the same ``serve`` with a larger asyncio pool.
    """

    def __init__(self, env: dict[str, str], log_path: Path, profile_path: Path | None, redis_pool: int = 0) -> None:
        self.env = env
        self.log_path = log_path
        self.profile_path = profile_path
        self.redis_pool = redis_pool
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.command = ""

    def command_for(self, port: int) -> list[str]:
        if self.redis_pool:
            serve = ["-m", "scripts.stream.app", "--max-connections", str(self.redis_pool)]
        else:
            serve = ["-m", "orchestrator.cli", "api"]
        prefix = ["-m", "cProfile", "-o", str(self.profile_path)] if self.profile_path is not None else []
        return [sys.executable, *prefix, *serve, "--host", "127.0.0.1", "--port", str(port)]

    def log_offset(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_counts(self, since: int) -> dict[str, int]:
        """How often the API logged each kind of stream trouble since byte ``since`` of its log."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(since)
                text = handle.read().decode(errors="replace")
        except OSError:
            return {}
        return {name: text.count(marker) for name, marker in LOG_MARKERS.items()}

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start the API and wait until ``/healthz`` answers (a few attempts, in case the free port was taken).

        Raises:
            RuntimeError: When it does not come up.
        """
        failure = ""
        for _ in range(3):
            self.port = _free_port()
            argv = self.command_for(self.port)
            self.command = " ".join(argv)
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    argv,
                    env=self.env,
                    cwd=REPO_ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            failure = self._wait_ready(timeout)
            if not failure:
                return
            self.stop(grace=2)
        raise RuntimeError(f"the API did not start: {failure} (log: {self.log_path})")

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"exited with code {self.process.returncode}"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return ""
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return f"no answer from /healthz within {timeout}s"

    def stop(self, grace: float = 15.0) -> None:
        """SIGINT, SIGKILL after ``grace``: uvicorn shuts down gracefully, then re-raises the signal; SIGINT then ends
        in a ``KeyboardInterrupt``, which lets cProfile write its file (the default SIGTERM action would not)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def profile_summary(path: Path, top: int = 40) -> dict[str, Any]:
    """The cProfile file's top functions by own time and by cumulative time, as text lines."""
    stats = pstats.Stats(str(path))
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = stats.stats  # type: ignore[attr-defined]

    def lines(index: int) -> list[str]:
        ordered = sorted(rows.items(), key=lambda kv: kv[1][index], reverse=True)[:top]
        return [f"{v[2]:8.2f} own {v[3]:8.2f} cum {v[1]:>9} calls  {_where(k)}" for k, v in ordered]

    return {"total_s": total, "file": str(path), "top_tottime": lines(2), "top_cumtime": lines(3)}


def _where(key: tuple[str, int, str]) -> str:
    filename, line, name = key
    for marker in ("site-packages/", f"{REPO_ROOT}/"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
    return f"{filename}:{line}({name})"


def hiredis_in(env: dict[str, str]) -> bool | None:
    """Whether redis-py finds hiredis (its C reply parser) with the API process's environment."""
    probe = "import redis.utils, sys; sys.stdout.write(str(redis.utils.HIREDIS_AVAILABLE))"
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], check=False, env=env, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"True": True, "False": False}.get(out.stdout.strip())
