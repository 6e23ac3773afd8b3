"""Starting real Celery worker processes on this machine: for ``orchestrator demo``, tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from celery import Celery

REPO_ROOT = Path(__file__).resolve().parents[2]


class LocalWorkers:
    """A set of ``celery -A workers worker`` processes.

    Args:
        app: A Celery app on the same broker, used to wait until the workers answer a ping.
        count: How many worker processes.
        env: Extra environment for them (``REDIS_URL``, ``ORCH_IMPORTS`` …).
        pool: Celery pool (``prefork``, ``threads``, ``gevent``).
        concurrency: Slots per worker.
        queues: Queues to consume.
        log_dir: Where each worker's log goes (default: discarded).
    """

    def __init__(
        self,
        app: Celery,
        *,
        count: int = 2,
        env: Mapping[str, str] | None = None,
        pool: str = "prefork",
        concurrency: int = 2,
        queues: Sequence[str] = ("llm", "cpu"),
        log_dir: Path | None = None,
        loglevel: str = "INFO",
    ) -> None:
        self.app = app
        self.count = count
        self.env = dict(env or {})
        self.pool = pool
        self.concurrency = concurrency
        self.queues = tuple(queues)
        self.log_dir = log_dir
        self.loglevel = loglevel
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._tag = uuid.uuid4().hex[:6]

    def start_one(self, index: int | None = None) -> str:
        """Start one more worker; returns its node name."""
        index = len(self.processes) + 1 if index is None else index
        name = f"w{index}-{self._tag}@{os.uname().nodename}"
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers",
            "worker",
            f"--hostname={name}",
            f"--pool={self.pool}",
            f"--concurrency={self.concurrency}",
            f"--queues={','.join(self.queues)}",
            f"--loglevel={self.loglevel}",
            "--without-mingle",
            "--without-gossip",
        ]
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        if self.log_dir is None:
            self.processes[name] = subprocess.Popen(
                argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=REPO_ROOT
            )
            return name
        with open(self.log_dir / f"{name.split('@', maxsplit=1)[0]}.log", "ab") as log:
            # The child keeps its own copy of the descriptor; ours closes with the block.
            self.processes[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        return name

    def start(self, timeout: float = 180.0) -> LocalWorkers:
        """Start ``count`` workers and wait until every one answers a ping (on a busy 2-core machine a worker can
        take a minute to import and connect); workers that did not all answer are stopped again.

        Raises:
            RuntimeError: When one exits or they do not answer within ``timeout`` (those started are stopped first).
        """
        try:
            for _ in range(self.count):
                self.start_one()
            self.wait_ready(list(self.processes), timeout)
        except BaseException:
            # A worker that never answered is still a process: stop what was started rather than leak it.
            self.stop(grace=5.0)
            raise
        return self

    def wait_ready(self, names: Sequence[str], timeout: float = 60.0) -> None:
        """Poll until the named workers answer a ping.

        Raises:
            RuntimeError: When one exits or they do not answer within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        waiting = set(names)
        while waiting:
            for name in list(waiting):
                code = self.processes[name].poll()
                if code is not None:
                    raise RuntimeError(f"worker {name} exited with code {code} while starting")
            replies = self.app.control.ping(destination=list(waiting), timeout=0.5) or []
            for reply in replies:
                waiting -= set(reply)
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"workers {sorted(waiting)} did not answer within {timeout}s")

    def pool_children(self, name: str) -> list[int]:
        """Pids of a prefork worker's pool processes."""
        pid = self.processes[name].pid
        path = Path(f"/proc/{pid}/task/{pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def kill(self, name: str) -> None:
        """SIGKILL a whole worker: its main process and its pool children, as a crash or OOM kill would."""
        children = self.pool_children(name)
        process = self.processes[name]
        process.kill()
        process.wait()
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)

    def stop(self, grace: float = 15.0) -> None:
        """Warm-shutdown every worker (SIGTERM), then SIGKILL what is left after ``grace`` seconds."""
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + grace
        for name, process in self.processes.items():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(name)
        self.processes.clear()

    def __enter__(self) -> LocalWorkers:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
