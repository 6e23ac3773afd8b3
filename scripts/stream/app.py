"""``orchestrator api`` with a larger asyncio Redis pool: a what-if for ``scripts.bench_stream --api-redis-pool N``.

Usage, from the repository root::

    REDIS_URL=... python -m scripts.stream.app --port 8000 --max-connections 5000

It serves exactly what ``orchestrator api`` serves (``orchestrator.api.server.serve`` with settings from the
environment), except that the asyncio Redis client ``create_app`` builds for the event streams gets
``max_connections=N``. The installed redis-py (8.x) caps an asyncio pool at 100 connections when none is given, and
every watched run's hub holds one for its blocking ``XREAD``: this measures what lifting that cap changes, without
touching the product code.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

import redis.asyncio as aioredis

from orchestrator.api import server
from orchestrator.api.app import create_app
from orchestrator.definition.registry import import_modules
from orchestrator.infra.settings import Settings


def with_pool(create_app: Callable[..., Any], max_connections: int) -> Callable[..., Any]:
    """``create_app`` whose ``redis.asyncio.Redis.from_url`` calls default to ``max_connections``."""
    original = aioredis.Redis.from_url

    def from_url(url: str, **kwargs: Any) -> aioredis.Redis:
        kwargs.setdefault("max_connections", max_connections)
        return original(url, **kwargs)

    @functools.wraps(create_app)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with mock.patch.object(aioredis.Redis, "from_url", from_url):
            return create_app(*args, **kwargs)

    return wrapped


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-connections", type=int, required=True)
    ns = parser.parse_args(argv)
    settings = Settings.from_env()
    import_modules(settings.imports)
    with mock.patch.object(server, "create_app", with_pool(create_app, ns.max_connections)):
        server.serve(settings, host=ns.host, port=ns.port)


if __name__ == "__main__":
    main()
