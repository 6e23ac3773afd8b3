"""The offline provider over real HTTP: a local Messages API for several worker processes to share.

Workers pointed at it (``ANTHROPIC_API_KEY=anything``, ``ANTHROPIC_BASE_URL=http://127.0.0.1:PORT``) use the real
SDK over a real socket. It answers as :class:`~orchestrator.llm.offline.OfflineMessagesAPI` does and can enforce a
requests-per-minute limit the way the service does (a token bucket, full at rest, answering 429 with
``retry-after``), so load tests see the provider push back. ``GET /stats`` reports what it billed::

    {"billed": 300, "undelivered": 0, "rate_limited": 12, "requests": 312, "billed_by_request": {"<sha256>": 1}}

``undelivered`` counts billed replies that could not be written back: the caller was gone (a worker killed during
the call). A real provider bills those too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import select
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx2

from orchestrator.llm.offline import OfflineMessagesAPI

__all__ = ["OfflineAPIServer", "serve_offline_api"]


class _Bucket:
    """Requests per minute as the provider counts them: capacity ``rpm``, refilled continuously."""

    def __init__(self, rpm: int) -> None:
        self.rpm = rpm
        self.level = float(rpm)
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> float:
        """0 when a request may pass (and counts it), else the seconds until one may."""
        with self.lock:
            now = time.monotonic()
            self.level = min(self.rpm, self.level + (now - self.stamp) * self.rpm / 60)
            self.stamp = now
            if self.level >= 1:
                self.level -= 1
                return 0.0
            return (1 - self.level) * 60 / self.rpm


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A caller that dies mid-request (a SIGKILLed worker) resets its connection: expected, not worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class OfflineAPIServer:
    """A threaded HTTP server answering ``POST /v1/messages`` offline.

    Args:
        host: Interface to listen on.
        port: Port (0 picks a free one).
        rpm: Requests per minute before answering 429; 0 for no limit.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, rpm: int = 0) -> None:
        self.api = OfflineMessagesAPI()
        self.bucket = _Bucket(rpm) if rpm > 0 else None
        self._lock = threading.Lock()
        self.billed: Counter[str] = Counter()
        self.rate_limited = 0
        self.requests = 0
        self.undelivered = 0
        self._httpd = _HTTPServer((host, port), self._handler())
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """Where the SDK should send requests."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def stats(self) -> dict[str, Any]:
        """Requests received, rate-limited and billed (a 200 reply), and billed replies per request digest."""
        with self._lock:
            return {
                "requests": self.requests,
                "rate_limited": self.rate_limited,
                "billed": sum(self.billed.values()),
                "undelivered": self.undelivered,
                "billed_by_request": dict(self.billed),
            }

    def start(self) -> OfflineAPIServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="offline-api", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted."""
        self._httpd.serve_forever()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()

    def _answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes | Iterator[bytes]]:
        if method == "GET" and path == "/stats":
            return 200, {"content-type": "application/json"}, json.dumps(self.stats()).encode()
        with self._lock:
            self.requests += 1
        if self.bucket is not None and path == "/v1/messages":
            wait = self.bucket.take()
            if wait > 0:
                with self._lock:
                    self.rate_limited += 1
                error = {"type": "error", "error": {"type": "rate_limit_error", "message": "rate limit (offline)"}}
                retry_after = {"retry-after": str(max(1, math.ceil(wait))), "content-type": "application/json"}
                return 429, retry_after, json.dumps(error).encode()
        request = httpx2.Request(method, f"http://offline.local{path}", headers=headers, content=body)
        try:
            response = self.api(request)
        except httpx2.TransportError:
            # A scripted transport failure: the connection just drops.
            raise ConnectionAbortedError from None
        if response.status_code == 200:
            digest = hashlib.sha256(body).hexdigest()
            with self._lock:
                self.billed[digest] += 1
        if response.headers.get("content-type") == "text/event-stream":
            return response.status_code, dict(response.headers), response.iter_raw()  # streamed as it is made
        return response.status_code, dict(response.headers), response.content

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                try:
                    status, headers, content = server._answer(
                        self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body
                    )
                except ConnectionAbortedError:
                    self.close_connection = True
                    return
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in {"content-length", "transfer-encoding", "connection", "content-encoding"}:
                        self.send_header(name, value)
                if not isinstance(content, bytes):
                    self._send_stream(status, content)
                    return
                self.send_header("content-length", str(len(content)))
                if status == 200 and _peer_closed(self.connection):
                    # The caller died while the reply was being made (a SIGKILLed worker): billed, never delivered.
                    with server._lock:
                        server.undelivered += 1
                    self.close_connection = True
                    return
                try:
                    self.end_headers()
                    self.wfile.write(content)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                    if status == 200:
                        with server._lock:
                            server.undelivered += 1

            def _send_stream(self, status: int, chunks: Iterator[bytes]) -> None:
                # A streamed reply (text/event-stream) goes out chunk by chunk, as the service sends it.
                self.send_header("transfer-encoding", "chunked")
                try:
                    self.end_headers()
                    for chunk in chunks:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError, httpx2.TransportError):
                    self.close_connection = True
                    if status == 200:
                        with server._lock:
                            server.undelivered += 1

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _peer_closed(sock: socket.socket) -> bool:
    # A caller waiting for its reply sends nothing more; a readable socket that reads empty has been closed.
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


@contextlib.contextmanager
def serve_offline_api(*, rpm: int = 0) -> Iterator[OfflineAPIServer]:
    """An :class:`OfflineAPIServer` on a free loopback port for the duration of the block."""
    server = OfflineAPIServer(rpm=rpm).start()
    try:
        yield server
    finally:
        server.stop()
