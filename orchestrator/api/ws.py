"""Run events over WebSocket: ``/runs/{id}/ws?after=SEQ`` sends each event as JSON text, in order.

A streaming step's deltas come as the SSE ``data`` JSON plus ``type`` (``llm_delta`` / ``llm_reset``); they have no
``seq``, and on every connect the text so far comes first.

The run's hub delivers every event to one :class:`WebSocketProgressListener`, which queues it for each WebSocket
client of that run; each client's connection drains its own queue. A client whose queue overflows is closed with
code 1013 ("try again later") and reconnects with ``?after=`` the last ``seq`` it got; one whose socket fails is
forgotten. Neither affects the other clients, the hub, or the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.websockets import WebSocketState

from orchestrator.api.auth import AuthError, Scope, bearer_token
from orchestrator.api.context import ApiContext, api_context
from orchestrator.api.streams import RunHub, Subscription, follow, nothing_more, run_exists
from orchestrator.engine.deltas import Delta
from orchestrator.engine.events import Event, ProgressListener

log = logging.getLogger(__name__)

router = APIRouter(tags=["events"])

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013


class WebSocketProgressListener(ProgressListener):
    """Pushes a run's events to every WebSocket client connected to it; a failing client never affects the others.

    The hub calls :meth:`on_event` for every event; :meth:`serve` runs one client's connection until the run ends,
    the client leaves, or it falls behind.

    Args:
        hub: The run's hub (for the client's starting position and the stream to replay).
        queue_size: Events a client may have unsent before it is dropped.
    """

    def __init__(self, hub: RunHub, queue_size: int) -> None:
        self.hub = hub
        self.queue_size = queue_size
        self._clients: dict[WebSocket, Subscription] = {}

    def __len__(self) -> int:
        return len(self._clients)

    def on_event(self, event: Event) -> None:
        """Queue ``event`` for every client (a full queue drops that client alone)."""
        for client in list(self._clients.values()):
            client.on_event(event)

    def on_delta(self, delta: Delta) -> None:
        """Queue ``delta`` for every client, as an event."""
        for client in list(self._clients.values()):
            client.on_delta(delta)

    async def serve(self, websocket: WebSocket, after: int) -> int:
        """Send the run's events after ``after`` to an accepted ``websocket``, replaying first, then live.

        Returns:
            The close code: 1000 after the run's final event, 1013 when the client fell behind, 1001 at shutdown,
            1011 when reading the stream failed; 0 when the client went away first.
        """
        subscription = Subscription(self.queue_size, self.hub.position)
        self._clients[websocket] = subscription
        sender = asyncio.ensure_future(self._send(websocket, after, subscription))
        receiver = asyncio.ensure_future(_until_disconnect(websocket))
        try:
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._clients.pop(websocket, None)
            subscription.close()
            sender.cancel()
            receiver.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)
        if sender not in done or sender.cancelled():
            return 0
        error = sender.exception()
        if isinstance(error, (WebSocketDisconnect, OSError, RuntimeError)):
            return 0  # the client went away mid-send
        if error is not None:
            log.warning("websocket stream of run %s failed: %r", self.hub.run_id, error)
            return CLOSE_INTERNAL_ERROR
        if subscription.dropped:
            return CLOSE_TRY_AGAIN_LATER
        return CLOSE_NORMAL if sender.result() else CLOSE_GOING_AWAY

    async def _send(self, websocket: WebSocket, after: int, subscription: Subscription) -> bool:
        """Send until the stream ends; ``True`` when it ended with the run rather than by closing."""
        async for event in follow(self.hub.redis, self.hub.run_id, after, subscription):
            await websocket.send_text(json.dumps(_message(event), separators=(",", ":")))
        return not subscription.closed


def _message(event: Event | Delta) -> dict[str, Any]:
    # A delta's JSON is the SSE data; a WebSocket has no ``event:`` line, so its type goes in the object.
    return {"type": event.type, **event.to_json()} if isinstance(event, Delta) else event.to_json()


async def _until_disconnect(websocket: WebSocket) -> None:
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass


async def refuse_handshake(websocket: WebSocket, status_code: int, message: str) -> None:
    """Refuse a WebSocket handshake: an HTTP error where the server allows it, else a close with 4000 + status."""
    body = JSONResponse({"detail": message}, status_code=status_code)
    if status_code == 401:
        body.headers["WWW-Authenticate"] = "Bearer"
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(body)
    else:
        await websocket.close(code=4000 + status_code, reason=message[:120])


@router.websocket("/runs/{run_id}/ws", name="run_events_ws")
async def run_events_ws(
    websocket: WebSocket,
    run_id: str,
    after: Annotated[
        int, Query(ge=0, description="Send events with seq > after (resume after the last one seen).")
    ] = 0,
) -> None:
    """Each event of the run as JSON text, in order; closes with 1000 after the run's final event."""
    ctx: ApiContext = api_context(websocket)
    try:
        ctx.auth.authorize(
            # Browsers cannot set headers on a WebSocket: ``?token=`` is accepted as for the SSE stream.
            bearer_token(websocket.headers.get("authorization")) or websocket.query_params.get("token"),
            Scope.READ,
            websocket.client.host if websocket.client else None,
        )
    except AuthError as exc:
        await refuse_handshake(websocket, exc.status_code, str(exc))
        return
    try:
        if not await run_exists(ctx.aredis, run_id):
            await refuse_handshake(websocket, 404, f"unknown run {run_id!r}")
            return
        await websocket.accept()
        code = await _stream(ctx, websocket, run_id, after)
    except RedisError as exc:
        log.warning("websocket stream of run %s: Redis does not answer: %s", run_id, exc)
        if websocket.client_state == WebSocketState.CONNECTING:
            await refuse_handshake(websocket, 503, "Redis does not answer; try again")
            return
        code = CLOSE_INTERNAL_ERROR
    if code and websocket.client_state == WebSocketState.CONNECTED:
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            await websocket.close(code, _REASONS.get(code, ""))


_REASONS = {
    CLOSE_NORMAL: "the run has ended",
    CLOSE_GOING_AWAY: "server shutting down",
    CLOSE_INTERNAL_ERROR: "server error; reconnect with ?after=SEQ",
    CLOSE_TRY_AGAIN_LATER: "too slow: reconnect with ?after=SEQ",
}


async def _stream(ctx: ApiContext, websocket: WebSocket, run_id: str, after: int) -> int:
    if await nothing_more(ctx.aredis, run_id, after):
        return CLOSE_NORMAL
    hub = await ctx.hubs.open(run_id)
    listener = hub.shared(WebSocketProgressListener, lambda: WebSocketProgressListener(hub, ctx.streams.queue_size))
    ctx.metrics.stream_clients.labels("ws").inc()
    try:
        code = await listener.serve(websocket, after)
    finally:
        ctx.metrics.stream_clients.labels("ws").dec()
        ctx.hubs.release(hub)
    if code == CLOSE_TRY_AGAIN_LATER:
        ctx.metrics.stream_drops.labels("ws").inc()
        log.info("a websocket client of run %s fell behind and was disconnected", run_id)
    return code
