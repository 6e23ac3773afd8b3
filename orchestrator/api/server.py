"""Serving the API with uvicorn (``orchestrator api``)."""

from __future__ import annotations

import logging

import uvicorn

from orchestrator.api.app import create_app
from orchestrator.api.auth import ApiAuth, check_bind
from orchestrator.settings import Settings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def serve(
    settings: Settings, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, auth: ApiAuth | None = None
) -> None:
    """Serve the API until interrupted.

    Raises:
        ApiConfigError: When ``ORCH_API_TOKENS`` is malformed, or it is unset and ``host`` is not loopback.
    """
    auth = auth if auth is not None else ApiAuth.from_env()
    check_bind(host, auth)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    # No access log: stream URLs may carry ``?token=`` (EventSource cannot send headers), and tokens are never
    # logged; request counts and latencies are in /metrics instead.
    uvicorn.run(create_app(settings, auth=auth), host=host, port=port, log_level="info", access_log=False)
