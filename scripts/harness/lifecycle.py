"""A private ``redis-server`` and real worker processes for one benchmark, and a ``main`` that always cleans up.

``private_redis`` turns SIGTERM and SIGHUP into ``SystemExit`` while it runs (``stop_on_signals``), so every
``finally`` block runs and Redis is stopped last; ``running`` stops the workers on the way out with Ctrl-C ignored,
so a second Ctrl-C cannot interrupt their shutdown; ``run_main`` turns Ctrl-C into exit code 130.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.dev.redis_server import RedisServer, stop_on_signals
from scripts.harness.records import RECORD_DIR_ENV
from scripts.harness.report import ARTIFACTS

T = TypeVar("T")


def run_main(body: Callable[[], int], *, stopped: str = "workers and Redis") -> int:
    """``body()``'s exit code; 130 after Ctrl-C (what it started is stopped by then). Ctrl-C is restored after.

    Args:
        body: Measures, reports and returns the exit code.
        stopped: What the interruption message says was stopped.
    """
    previous = signal.getsignal(signal.SIGINT)
    try:
        return body()
    except KeyboardInterrupt:
        print(f"interrupted: {stopped} stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def private_redis(**options: Any) -> Iterator[RedisServer]:
    """A ``redis-server`` on a random free port (``RedisServer(**options)``), stopped when the block ends.

    Raises:
        SystemExit: On SIGTERM or SIGHUP inside the block (after the ``finally`` blocks ran and Redis stopped).
    """
    server = RedisServer(**options)
    with stop_on_signals(server):
        server.start()
        yield server


def pool_workers(app: Any, cfg: Any, env: dict[str, str], logs: Path) -> LocalWorkers:
    """The workers the common options ask for (``cfg.workers``, ``pool``, ``concurrency``, ``loglevel``), unstarted."""
    return LocalWorkers(
        app,
        count=cfg.workers,
        env=env,
        pool=cfg.pool,
        concurrency=cfg.concurrency,
        log_dir=logs,
        loglevel=cfg.loglevel,
    )


@contextmanager
def running(workers: LocalWorkers, *, grace: float, timeout: float = 180.0) -> Iterator[LocalWorkers]:
    """Start ``workers``, wait until each answers a ping, and stop them when the block ends.

    Args:
        workers: Not started yet.
        grace: Seconds of warm shutdown before what is left is SIGKILLed.
        timeout: Seconds they may take to answer.

    Raises:
        RuntimeError: A worker exits or does not answer within ``timeout``.
    """
    try:
        workers.start(timeout=timeout)
        yield workers
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            workers.stop(grace=grace)
        finally:
            signal.signal(signal.SIGINT, previous)


def worker_env(redis_url: str, imports: str, *, record_dir: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of benchmark workers: the private Redis, the modules to import, where raw tasks record."""
    env = {"REDIS_URL": redis_url, "ORCH_IMPORTS": imports, **extra}
    if record_dir is not None:
        env[RECORD_DIR_ENV] = record_dir
    return env


def log_dir(name: str, *, fresh: bool = False) -> Path:
    """``test-artifacts/NAME/`` for worker logs, created; emptied first when ``fresh``."""
    path = ARTIFACTS / name
    if fresh and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def record_dir(prefix: str) -> Iterator[str]:
    """A temporary directory for the raw tasks' record files, removed when the block ends."""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- asyncio benchmarks --------------------------------------------------------------------------------------------


def run_loop(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine ``main()`` returns in a new event loop: uvloop's when installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


async def until_signalled(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``; on SIGINT, SIGTERM or SIGHUP cancel it (its ``finally`` blocks stop what it started) and raise
    ``KeyboardInterrupt`` or ``SystemExit(128 + signum)``.

    ``stop_on_signals``'s handler raises ``SystemExit`` from a plain signal handler, and asyncio's own Ctrl-C handling
    cancels the main task once; a single cancel can be lost (``asyncio.wait_for`` before Python 3.12 swallows one
    that races with its result), so the work is cancelled until it has really stopped. The previous handlers come
    back afterwards, for the cleanup that follows outside the loop.
    """
    loop = asyncio.get_running_loop()
    received: list[int] = []
    signalled = asyncio.Event()

    def on_signal(signum: int) -> None:
        received.append(signum)
        signalled.set()

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for signum in previous:
        loop.add_signal_handler(signum, on_signal, signum)
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(signalled.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        print(f"signal {received[0]}: stopping", file=sys.stderr)
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        if not task.cancelled() and task.exception() is not None:
            print(f"error while stopping: {task.exception()!r}", file=sys.stderr)
        if received[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + received[0])
    finally:
        waiter.cancel()
        for signum, handler in previous.items():
            loop.remove_signal_handler(signum)
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
