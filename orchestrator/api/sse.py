"""Run events as Server-Sent Events: ``GET /runs/{id}/events``.

Each event is framed as ``id: SEQ`` / ``event: TYPE`` / ``data: JSON``; a reconnecting client sends the last ``seq``
it got as ``Last-Event-ID`` (browsers do this by themselves) or ``?after=``, and misses and repeats nothing. A
streaming step's ``llm_delta`` and ``llm_reset`` come without ``id:``; on every connect the text so far comes first. The
stream ends after the run's final event; a client asking for more of a run that has ended gets 204, which tells
browsers to stop reconnecting.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from orchestrator.api.context import ApiContext, api_context
from orchestrator.api.deps import StreamReader
from orchestrator.api.routes_runs import RunId
from orchestrator.api.schemas import Problem
from orchestrator.api.streams import follow, nothing_more, run_exists
from orchestrator.engine.deltas import Delta
from orchestrator.engine.events import Event
from orchestrator.errors import RunNotFoundError

log = logging.getLogger(__name__)

router = APIRouter(tags=["events"])

SEPARATOR = "\n"


def sse_frame(event: Event | Delta) -> ServerSentEvent:
    """The SSE frame of ``event``: its ``seq`` as ``id``, its type as ``event``, its JSON as ``data``.

    A delta (``llm_delta``, ``llm_reset``) has no ``id:``: it is not in the run's durable numbering, so the client's
    ``Last-Event-ID`` stays the last step event's.
    """
    data = json.dumps(event.to_json(), separators=(",", ":"))
    if isinstance(event, Delta):
        return ServerSentEvent(data=data, event=event.type, sep=SEPARATOR)
    return ServerSentEvent(data=data, event=event.type, id=str(event.seq), sep=SEPARATOR)


def start_after(after: int | None, last_event_id: str | None) -> int:
    """Where a client resumes: ``Last-Event-ID`` (sent on reconnects) wins over ``?after=``.

    Raises:
        HTTPException: 422 when ``Last-Event-ID`` is not a sequence number.
    """
    if last_event_id is not None and last_event_id.strip():
        value = last_event_id.strip()
        if not value.isdigit():
            raise HTTPException(422, "header Last-Event-ID: must be an event's seq (a non-negative integer)")
        return int(value)
    return after or 0


class _EventStream(EventSourceResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            # The client stopped reading: give its connection up; it reconnects with Last-Event-ID.
            log.info("an SSE client accepted nothing for %ss and was disconnected", self.send_timeout)


async def _frames(ctx: ApiContext, run_id: str, after: int) -> AsyncIterator[ServerSentEvent]:
    try:
        hub = await ctx.hubs.open(run_id)
    except RedisError as exc:
        log.warning("SSE stream of run %s: Redis does not answer: %s", run_id, exc)
        return  # the client reconnects with Last-Event-ID
    subscription = hub.subscribe(ctx.streams.queue_size)
    ctx.metrics.stream_clients.labels("sse").inc()
    try:
        async for event in follow(ctx.aredis, run_id, after, subscription):
            yield sse_frame(event)
    except RedisError as exc:
        log.warning("SSE stream of run %s: Redis does not answer: %s", run_id, exc)
    else:
        if subscription.dropped:
            ctx.metrics.stream_drops.labels("sse").inc()
            log.info("an SSE client of run %s fell behind and was disconnected", run_id)
    finally:
        ctx.metrics.stream_clients.labels("sse").dec()
        hub.unsubscribe(subscription)
        ctx.hubs.release(hub)


@router.get(
    "/runs/{run_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The run's events, then the stream ends."},
        204: {"description": "The run has ended and the client has seen all of it."},
        **{code: {"model": Problem} for code in (401, 403, 404, 422)},
    },
)
async def run_events(
    run_id: RunId,
    request: Request,
    _: StreamReader,
    after: Annotated[int | None, Query(ge=0, description="Send events with seq > after.")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
) -> Response:
    """The run's events as Server-Sent Events, replayed after ``Last-Event-ID`` (or ``?after=``), then live."""
    ctx = api_context(request)
    start = start_after(after, last_event_id)
    if not await run_exists(ctx.aredis, run_id):
        raise RunNotFoundError(run_id)
    if await nothing_more(ctx.aredis, run_id, start):
        return Response(status_code=204)
    return _EventStream(
        _frames(ctx, run_id, start),
        ping=ctx.streams.keepalive_s,
        sep=SEPARATOR,
        send_timeout=ctx.streams.send_timeout_s,
    )
