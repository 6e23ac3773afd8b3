"""Serving the API with uvicorn (``orchestrator api``)."""

from __future__ import annotations

import os

import uvicorn

from orchestrator.api.app import create_app
from orchestrator.api.auth import ApiAuth, check_bind
from orchestrator.infra.settings import Settings
from orchestrator.telemetry.logs import Redactor, configure_logging

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def serve(
    settings: Settings, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, auth: ApiAuth | None = None
) -> None:
    """Serve the API until interrupted.

    Logs go to stderr in ``ORCH_LOG_FORMAT`` at ``ORCH_LOG_LEVEL`` (default ``INFO``), uvicorn's own included, with
    the API tokens and other secrets redacted (:mod:`orchestrator.telemetry.logs`).

    Raises:
        ApiConfigError: When ``ORCH_API_TOKENS`` is malformed, or it is unset and ``host`` is not loopback.
        LogConfigError: When ``ORCH_LOG_FORMAT`` or ``ORCH_LOG_LEVEL`` is not a known format or level.
    """
    auth = auth if auth is not None else ApiAuth.from_env()
    check_bind(host, auth)
    configure_logging(
        log_format=settings.log_format,
        level=settings.log_level or "INFO",
        redactor=Redactor.from_env(os.environ, extra=[token for token, _ in auth.tokens]),
    )
    # No access log: stream URLs may carry ``?token=`` (EventSource cannot send headers), and tokens are never
    # logged; request counts and latencies are in /metrics instead. Neither log_config nor log_level: uvicorn's
    # loggers then propagate to the root handler above, at its level, instead of getting handlers of their own.
    uvicorn.run(create_app(settings, auth=auth), host=host, port=port, log_config=None, access_log=False)
