"""A local HTTP server that answers like the Anthropic Messages API, for tests of the real SDK path.

::

    with fake_anthropic_server() as server:
        server.reply(FakeReply(status=429, body=error_body("rate_limit_error"), headers={"retry-after": "3"}))
        client = AnthropicClient(api_key="test", base_url=server.base_url)
        ...
        assert len(server.requests) == 1

Every request is recorded; each is answered with the next queued reply, or the standing one once the queue is
empty (a minimal valid message by default).
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def message_body(text: str = "Hello", model: str = "claude-haiku-4-5", **usage: int) -> dict[str, Any]:
    """A minimal valid Messages API response body."""
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": usage.get("input_tokens", 12), "output_tokens": usage.get("output_tokens", 7)},
    }


def error_body(error_type: str, message: str = "simulated failure", request_id: str = "req_fake") -> dict[str, Any]:
    """An Anthropic error response body."""
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": request_id}


@dataclass(frozen=True)
class FakeReply:
    """How the server answers one request.

    Attributes:
        status: HTTP status.
        body: JSON-serialisable body, or ``str`` sent as plain text.
        headers: Extra response headers.
        delay_s: Seconds to wait before answering (cut short when the server stops).
    """

    status: int = 200
    body: Any = field(default_factory=message_body)
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: Any


class FakeAnthropicServer:
    """The state behind :func:`fake_anthropic_server`: scripted replies and recorded requests."""

    def __init__(self, base_url: str, stopping: threading.Event) -> None:
        self.base_url = base_url
        self._stopping = stopping
        self._lock = threading.Lock()
        self._queue: deque[FakeReply] = deque()
        self._standing = FakeReply()
        self._requests: list[RecordedRequest] = []

    @property
    def requests(self) -> list[RecordedRequest]:
        """Requests received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def reply(self, reply: FakeReply) -> None:
        """Answer every request from now on (after any queued replies) with ``reply``."""
        with self._lock:
            self._standing = reply

    def queue(self, *replies: FakeReply) -> None:
        """Answer the next requests with ``replies``, in order."""
        with self._lock:
            self._queue.extend(replies)

    def _next_reply(self, request: RecordedRequest) -> FakeReply:
        with self._lock:
            self._requests.append(request)
            return self._queue.popleft() if self._queue else self._standing


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        recorded = RecordedRequest("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        fake = self.server.fake
        reply = fake._next_reply(recorded)
        if reply.delay_s and fake._stopping.wait(reply.delay_s):
            return
        payload = reply.body.encode() if isinstance(reply.body, str) else json.dumps(reply.body).encode()
        content_type = "text/plain" if isinstance(reply.body, str) else "application/json"
        self.send_response(reply.status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(payload)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 serialises concurrent clients.
    request_queue_size = 128
    daemon_threads = True
    fake: FakeAnthropicServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (a timeout test) leaves a broken pipe behind; that is expected, not news.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def fake_anthropic_server() -> Iterator[FakeAnthropicServer]:
    """Run a fake Messages API on 127.0.0.1 on a free port for the duration of the block."""
    stopping = threading.Event()
    server = _Server(("127.0.0.1", 0), _Handler)
    host, port = server.server_address[:2]
    server.fake = FakeAnthropicServer(f"http://{host!s}:{port}", stopping)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.fake
    finally:
        stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens, so connecting is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"
