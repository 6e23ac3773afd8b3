"""The HTTP API: runs, live events (SSE and WebSocket), workflows, health and metrics.

``create_app(settings)`` builds the ASGI app; ``orchestrator api`` serves it with uvicorn. Modules:
``app`` (factory and error mapping), ``auth`` (tokens and scopes), ``guard`` (the ``Host``, ``Origin`` and JSON body
checks before routing), ``schemas`` (bodies), ``routes_runs``, ``routes_meta``, ``sse`` and ``ws`` (endpoints),
``streams`` (the per-run event hubs), ``metrics``.
"""

from orchestrator.api.app import create_app
from orchestrator.api.auth import ApiAuth, ApiConfigError, Principal, Scope
from orchestrator.api.context import StreamLimits
from orchestrator.api.ws import WebSocketProgressListener

__all__ = [
    "ApiAuth",
    "ApiConfigError",
    "Principal",
    "Scope",
    "StreamLimits",
    "WebSocketProgressListener",
    "create_app",
]
