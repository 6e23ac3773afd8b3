"""The ASGI app: ``create_app(settings)`` wires the client, auth, event hubs and metrics into FastAPI.

Every client mistake is a 4xx with a one-line ``detail`` naming the problem; the orchestrator's errors map onto
status codes here, in one place.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.api import routes_meta, routes_runs, sse, ws
from orchestrator.api.auth import TOKENS_ENV, ApiAuth, AuthError
from orchestrator.api.context import ApiContext, StreamLimits
from orchestrator.api.guard import BrowserGuardMiddleware
from orchestrator.api.metrics import ApiMetrics, RequestMetricsMiddleware
from orchestrator.api.streams import EventHubs
from orchestrator.errors import (
    DefinitionNotFoundError,
    InputValidationError,
    OrchestratorError,
    RunNotFoundError,
    RunStateError,
    StoreUnavailableError,
    WorkflowDefinitionError,
)
from orchestrator.infra.redis_url import async_client, require_shared_store, sync_client
from orchestrator.infra.settings import Settings
from orchestrator.web import router as web_router

if TYPE_CHECKING:
    from orchestrator.client import Client

log = logging.getLogger(__name__)

# Room for a workflow definition of the largest allowed size; inputs have their own cap (max_input_bytes) on top.
MAX_BODY_BYTES = 4 * 1024 * 1024

_STATUS_OF: tuple[tuple[type[Exception], int], ...] = (
    (RunNotFoundError, 404),
    (DefinitionNotFoundError, 404),
    (RunStateError, 409),
    (StoreUnavailableError, 503),
    (WorkflowDefinitionError, 422),
    (InputValidationError, 422),
    (OrchestratorError, 400),
)


def create_app(
    settings: Settings,
    client: Client | None = None,
    *,
    auth: ApiAuth | None = None,
    streams: StreamLimits | None = None,
) -> FastAPI:
    """The HTTP API as an ASGI app.

    Args:
        settings: Where Redis is, limits.
        client: The client to submit and control runs with (default: one built from ``settings``).
        auth: Tokens and scopes (default: read from ``ORCH_API_TOKENS``).
        streams: Limits for event stream clients.

    Raises:
        ApiConfigError: When ``ORCH_API_TOKENS`` is malformed.
        RedisUrlError: ``REDIS_URL`` is ``memory://``: the API server's runs must be seen by workers.
    """
    require_shared_store(settings.redis_url, "the API server")
    auth = auth if auth is not None else ApiAuth.from_env()
    if client is None:
        from orchestrator.client import Client

        client = Client(settings)
    streams = streams or StreamLimits()
    metrics = ApiMetrics()
    aredis = async_client(
        settings.redis_url,
        socket_connect_timeout=5,
        socket_timeout=streams.block_ms / 1000 + 10,
        health_check_interval=30,
        max_connections=streams.redis_connections,
    )
    context = ApiContext(
        settings=settings,
        client=client,
        auth=auth,
        metrics=metrics,
        redis=sync_client(settings.redis_url, decode_responses=True, socket_connect_timeout=5, socket_timeout=30),
        aredis=aredis,
        hubs=EventHubs(aredis, block_ms=streams.block_ms, batch=streams.read_batch, on_change=metrics.hubs.set),
        streams=streams,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if auth.enabled:
            log.info("API authentication on: %d tokens for %s", len(auth.tokens), ", ".join(auth.principals))
        else:
            log.warning("%s is not set: the API has no authentication and serves loopback clients only", TOKENS_ENV)
        try:
            yield
        finally:
            await context.hubs.close()
            await aredis.aclose()
            context.redis.close()

    app = FastAPI(
        title="orchestrator",
        summary="Submit, watch and control runs of multi-step LLM workflows.",
        description=(
            "Send `Authorization: Bearer TOKEN` (tokens come from `ORCH_API_TOKENS`) and JSON bodies "
            "(`Content-Type: application/json`). Without tokens only loopback clients are served, under a loopback "
            "`Host`, from no foreign `Origin`. Live events: "
            "`GET /runs/{run_id}/events` (Server-Sent Events, resumes after `Last-Event-ID`) and the WebSocket "
            "`/runs/{run_id}/ws?after=SEQ` (each event as JSON text; not listed below, OpenAPI has no WebSockets)."
        ),
        version=_version(),
        lifespan=lifespan,
        max_body_size=MAX_BODY_BYTES + settings.max_input_bytes,
    )
    app.state.orchestrator = context
    # Added first, so it runs inside the metrics middleware: refused requests are counted too.
    app.add_middleware(BrowserGuardMiddleware, auth=auth)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    for router in (routes_runs.router, sse.router, ws.router, routes_meta.router, web_router):
        app.include_router(router)
    _install_error_handlers(app)
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llm-orchestrator")
    except PackageNotFoundError:
        return "0"


def _problem(status_code: int, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status_code)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    where, *rest = [str(part) for part in loc] or ["request"]
    if where == "body":
        return ".".join(rest) or "body"
    return f"{where} parameter {'.'.join(rest)}" if rest else where


def _install_error_handlers(app: FastAPI) -> None:
    async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [{"field": _field(e["loc"]), "message": e["msg"], "type": e["type"]} for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
        return _problem(422, detail, errors=errors)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    async def auth_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AuthError)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status_code, headers=headers)

    async def orchestrator_error(_: Request, exc: Exception) -> JSONResponse:
        status_code = next(code for kind, code in _STATUS_OF if isinstance(exc, kind))
        if status_code == 503:
            log.warning("store unavailable: %s", exc)
        return _problem(status_code, str(exc))

    async def redis_error(_: Request, exc: Exception) -> JSONResponse:
        log.warning("Redis error: %s", exc)
        return _problem(503, "Redis does not answer; try again")

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error in the API", exc_info=exc)
        return _problem(500, "internal error")

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(AuthError, auth_error)
    app.add_exception_handler(OrchestratorError, orchestrator_error)
    app.add_exception_handler(redis.RedisError, redis_error)
    app.add_exception_handler(Exception, unexpected)
