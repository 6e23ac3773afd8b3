"""SSE clients in one asyncio loop: each follows its run's events, stamps every frame on arrival, and reconnects
with ``Last-Event-ID`` when its stream drops."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import httpx

RUN_ENDS = frozenset({"run_succeeded", "run_failed", "run_cancelled", "run_timed_out"})
WIRE_KEYS = frozenset({"run_id", "seq", "type", "step", "attempt", "ts", "data"})
MAX_RECONNECTS = 10_000  # in practice: until the scenario's deadline
RECONNECT_MAX_S = 3.0
STREAMS_PER_HTTP_CLIENT = 50  # httpx pools scan their connections per request: many small pools stay cheap


@dataclass
class OpenStreams:
    """Streams with response headers received and not ended yet, and the most at once."""

    now: int = 0
    peak: int = 0
    stopping: bool = False  # the scenario is over: no more reconnects

    def opened(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def closed(self) -> None:
        self.now -= 1


@dataclass
class StreamRecord:
    """What one SSE client saw of its run."""

    run_id: str
    # (seq, type, step, attempt, ts epoch, receive time.time()) in arrival order
    events: list[tuple[int, str, str | None, int, float, float]] = field(default_factory=list)
    last_seq: int = 0
    final_seen: bool = False
    t_request: float | None = None
    t_open: float | None = None
    t_final: float | None = None
    t_eof: float | None = None
    connections: int = 0
    reconnects: int = 0
    drops: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    frame_errors: list[str] = field(default_factory=list)
    pings: int = 0
    got_204: bool = False
    error: str | None = None

    def on_frame(self, frame: dict[bytes, bytes], now: float) -> None:
        try:
            data = json.loads(frame.get(b"data", b""))
            seq, kind = int(data["seq"]), str(data["type"])
            ts = datetime.fromisoformat(data["ts"]).timestamp()
        except (ValueError, KeyError, TypeError) as exc:
            self.frame_errors.append(f"unparseable frame {frame!r}: {exc}")
            return
        if frame.get(b"id") != str(seq).encode() or frame.get(b"event") != kind.encode():
            self.frame_errors.append(f"id/event {frame.get(b'id')!r}/{frame.get(b'event')!r} ≠ seq/type {seq}/{kind}")
        if set(data) != WIRE_KEYS or data["run_id"] != self.run_id:
            self.frame_errors.append(f"data keys {sorted(data)} / run_id {data.get('run_id')!r}")
        self.events.append((seq, kind, data.get("step"), int(data.get("attempt") or 0), ts, now))
        self.last_seq = seq
        if kind in RUN_ENDS:
            self.final_seen = True
            self.t_final = now


async def _read_frames(response: httpx.Response, record: StreamRecord, stopping: Callable[[], bool]) -> None:
    """Parse SSE frames (``field: value`` lines, a blank line ends a frame) as chunks arrive; stamp each frame with
    the arrival time of the chunk that completed it."""
    buffer = b""
    frame: dict[bytes, bytes] = {}
    async for chunk in response.aiter_raw():
        now = time.time()
        if stopping():
            return
        buffer += chunk
        if b"\n" not in chunk:
            continue
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if not line:
                if frame:
                    record.on_frame(frame, now)
                    frame = {}
            elif line.startswith(b":"):
                record.pings += 1
            else:
                name, _, value = line.partition(b":")
                value = value.removeprefix(b" ")
                frame[name] = frame[name] + b"\n" + value if name == b"data" and name in frame else value


async def sse_client(http: httpx.AsyncClient, record: StreamRecord, deadline: float, streams: OpenStreams) -> None:
    """Follow the run's events until its final event; reconnect with ``Last-Event-ID`` when the stream drops."""
    backoff = 0.1
    while True:
        headers = {"Accept": "text/event-stream"}
        if record.connections:
            headers["Last-Event-ID"] = str(record.last_seq)
        record.connections += 1
        t_request = time.time()
        opened = False
        try:
            async with http.stream("GET", f"/runs/{record.run_id}/events", headers=headers) as response:
                record.statuses.append(response.status_code)
                if response.status_code == 204:
                    record.got_204 = True  # the run ended and we have seen all of it
                    return
                if response.status_code != 200:
                    await response.aread()
                    record.drops.append(f"HTTP {response.status_code}: {response.text[:200]}")
                else:
                    if record.t_open is None:
                        record.t_request, record.t_open = t_request, time.time()
                    opened = True
                    streams.opened()
                    await _read_frames(response, record, lambda: streams.stopping)
                    if record.final_seen:
                        record.t_eof = time.time()
                        return
                    record.drops.append("stream ended before the run's final event")
        except httpx.HTTPError as exc:
            task = asyncio.current_task()
            if streams.stopping or (task is not None and task.cancelling()):
                raise asyncio.CancelledError from exc  # a cancel that the HTTP stack turned into an I/O error
            if record.final_seen:
                record.drops.append(f"{type(exc).__name__} after the final event: {exc}")
                return
            record.drops.append(f"{type(exc).__name__}: {exc}")
        finally:
            if opened:
                streams.closed()
        if streams.stopping:
            return
        if time.monotonic() > deadline or record.reconnects >= MAX_RECONNECTS or record.final_seen:
            record.error = f"gave up after {record.reconnects} reconnects: {record.drops[-1:]}"
            return
        record.reconnects += 1
        # Like a browser's EventSource (reconnection time ~3 s), with exponential steps up to it and some jitter.
        await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
        backoff = min(backoff * 2, RECONNECT_MAX_S)


async def cancel_all(tasks: Sequence[asyncio.Task[None]], timeout: float = 15.0) -> None:
    """Cancel the client tasks and wait for them, cancelling again those still running: anyio's shielded sections
    inside httpcore can absorb a cancel, after which such a task would carry on reading its stream."""
    pending = [t for t in tasks if not t.done()]
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.5)
        pending = [t for t in pending if not t.done()]
    if pending:
        print(f"warning: {len(pending)} client tasks did not stop", file=sys.stderr)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" noise


class HttpClients:
    """Several httpx clients, ``STREAMS_PER_HTTP_CLIENT`` streams each (httpx's pool scans its connections on every
    request, so one pool of 1,000 streaming connections costs the client loop quadratic time)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._clients: list[httpx.AsyncClient] = []
        self._used = 0

    def next(self) -> httpx.AsyncClient:
        index = self._used // STREAMS_PER_HTTP_CLIENT
        self._used += 1
        while len(self._clients) <= index:
            self._clients.append(
                httpx.AsyncClient(
                    base_url=self.base_url,
                    timeout=httpx.Timeout(connect=30.0, read=60.0, write=30.0, pool=30.0),
                    limits=httpx.Limits(max_connections=None, max_keepalive_connections=STREAMS_PER_HTTP_CLIENT),
                )
            )
        return self._clients[index]

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self._clients), return_exceptions=True)
        self._clients.clear()
        self._used = 0
