"""Redis Cluster for state: the ``redis+cluster://`` URL, its clients, and what a pipeline must do differently there.

The URL is the ``redis+sentinel://`` form's sibling::

    redis+cluster://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/[?OPTION=VALUE&...]
    rediss+cluster://...      the same over TLS to every node

The hosts are seed nodes (port 6379 when left out): any one that answers tells the client the whole cluster's slot
map. A cluster has only database 0, so the path is empty or ``/``. Options: with ``rediss+cluster`` the ``ssl_*``
options of a ``rediss://`` URL.

Clients built here are redis-py's ``RedisCluster`` (sync and asyncio). They follow ``MOVED`` and ``ASK`` redirects,
refresh the slot map when a node goes away, and raise ``ConnectionError`` (or ``ClusterDownError`` while no master
serves a slot) during a failover, which the workers wait out like any Redis outage
(:mod:`orchestrator.engine.outage`). Every script's keys share one hash tag (one slot), so a script runs on one node;
a pipeline may touch keys of many slots, and redis-py's cluster pipeline sends each node its part.

Celery's Redis transport cannot use a cluster: with a cluster URL for state, ``ORCH_BROKER_URL`` names the broker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeGuard, cast

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as acluster
import redis.cluster

from orchestrator.errors import StoreUnavailableError
from orchestrator.infra.redis_url import RedisUrlError, host_port, split_multi_host_url, url_options

__all__ = [
    "CLUSTER_SCHEMES",
    "DEFAULT_CLUSTER_PORT",
    "ClusterUrl",
    "async_cluster_client",
    "cluster_client",
    "is_cluster_client",
    "is_cluster_url",
    "parse_cluster_url",
    "queue_evalsha",
    "queue_publish",
    "script_args",
]

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_CLUSTER_PORT = 6379
CLUSTER_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ClusterDownError,
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.MasterDownError,
)
"""What a Redis Cluster answers while it fails over or moves slots: an outage the workers wait out."""

_EXAMPLE = "redis+cluster://[:PASSWORD@]HOST:6379[,HOST:6379...]/"


@dataclass(frozen=True)
class ClusterUrl:
    """A parsed ``redis+cluster://`` URL.

    Attributes:
        nodes: ``(host, port)`` of each seed node, in the URL's order.
        username: The nodes' ACL user, if any.
        password: The nodes' password, if any.
        tls: TLS to every node (``rediss+cluster``).
        ssl_options: redis-py ``ssl_*`` connection options.
    """

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ssl_options: tuple[tuple[str, Any], ...] = ()

    def node_kwargs(self) -> dict[str, Any]:
        """Connection options for every node (redis-py names)."""
        options: dict[str, Any] = {"username": self.username, "password": self.password}
        if self.tls:
            options.update(ssl=True, **dict(self.ssl_options))
        return options


def is_cluster_url(url: str | None) -> bool:
    """Whether ``url`` is a ``redis+cluster://`` or ``rediss+cluster://`` URL."""
    return url is not None and url.strip().lower().startswith(tuple(f"{s}://" for s in CLUSTER_SCHEMES))


def parse_cluster_url(url: str) -> ClusterUrl:
    """Parse a cluster URL (the module docstring gives its form).

    Raises:
        RedisUrlError: Naming what is wrong: the scheme, a host or port, a path, an option. The password never
            appears in the message.
    """
    parts = split_multi_host_url(url, CLUSTER_SCHEMES, "cluster")
    if "@" in parts.path:
        raise RedisUrlError(
            "the cluster URL has '@' after its hosts: percent-encode '/' (%2F) and '@' (%40) in a password"
        )
    if parts.path.strip("/"):
        raise RedisUrlError(
            f"a Redis Cluster has only database 0: the cluster URL's path must be / or empty, not /{parts.path}"
        )
    if not parts.hosts.strip():
        raise RedisUrlError(f"the cluster URL names no node; expected {_EXAMPLE}")
    return ClusterUrl(
        nodes=tuple(host_port(part.strip(), "cluster node", DEFAULT_CLUSTER_PORT) for part in parts.hosts.split(",")),
        username=parts.username,
        password=parts.password,
        tls=parts.tls,
        ssl_options=tuple(url_options(parts.query, parts.tls, "cluster", "cluster").items()),
    )


def cluster_client(
    url: str, *, max_connections: int | None = None, wait_s: float | None = None, **options: Any
) -> redis.Redis:
    """A redis-py ``RedisCluster`` for ``url``, typed as ``redis.Redis`` (it has the same commands).

    Args:
        url: A ``redis+cluster://`` URL.
        max_connections: Connections per node at most; with ``wait_s``, a thread that finds them all in use waits
            that long for one (a blocking pool per node) instead of failing.
        wait_s: See ``max_connections``.
        **options: redis-py connection options (``socket_timeout``, ``decode_responses`` …).

    Raises:
        RedisUrlError: A malformed cluster URL.
        StoreUnavailableError: No seed node answers (redis-py reads the slot map when the client is built).
    """
    parsed = parse_cluster_url(url)
    pool: dict[str, Any] = {}
    if max_connections is not None:
        pool["max_connections"] = max_connections
        if wait_s is not None:
            pool["connection_pool_class"] = _waiting_pool(wait_s)
    options.pop("health_check_interval", None)
    try:
        client = redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(host, port) for host, port in parsed.nodes],  # type: ignore[no-untyped-call]
            **parsed.node_kwargs(),
            **pool,
            **options,
        )
    except (redis.exceptions.RedisClusterException, redis.RedisError) as exc:
        # redis-py asks a seed node for the slot map here, at construction, unlike a plain client's first command.
        raise StoreUnavailableError(f"cannot reach the Redis Cluster at {_nodes(parsed)}: {_first_line(exc)}") from None
    # Duck-typed: RedisCluster has every command the store uses, and pipelines that split by node.
    return cast(redis.Redis, client)


def _nodes(parsed: ClusterUrl) -> str:
    return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in parsed.nodes)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


def _waiting_pool(wait_s: float) -> type[redis.BlockingConnectionPool]:
    # redis-py hands a cluster's connection options to plain clients too, which know no ``timeout``: it goes here.
    class WaitingPool(redis.BlockingConnectionPool):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(timeout=wait_s, **kwargs)  # type: ignore[no-untyped-call]

    return WaitingPool


def async_cluster_client(url: str, **options: Any) -> aioredis.Redis:
    """An asyncio ``RedisCluster`` for ``url``, typed as ``redis.asyncio.Redis`` (see :func:`cluster_client`).

    Raises:
        RedisUrlError: A malformed cluster URL.
    """
    parsed = parse_cluster_url(url)
    options.pop("health_check_interval", None)
    client = acluster.RedisCluster(
        startup_nodes=[acluster.ClusterNode(host, port) for host, port in parsed.nodes],
        **parsed.node_kwargs(),
        **options,
    )
    return cast(aioredis.Redis, client)


def is_cluster_client(client: object) -> bool:
    """Whether ``client`` (sync or asyncio, a client or a pipeline) talks to a Redis Cluster."""
    return _of_kind(client, _CLUSTER_CLIENTS)


def _is_cluster_pipeline(pipe: object) -> TypeGuard[redis.cluster.ClusterPipeline]:
    return _of_kind(pipe, _CLUSTER_PIPELINES)


_CLUSTER_CLIENTS = (redis.cluster.RedisCluster, acluster.RedisCluster, acluster.ClusterPipeline)
_CLUSTER_PIPELINES = (redis.cluster.ClusterPipeline,)
_KINDS: dict[tuple[type, tuple[type, ...]], bool] = {}


def _of_kind(value: object, kinds: tuple[type, ...]) -> bool:
    """``isinstance(value, kinds)``, remembered by ``value``'s type: redis-py's classes derive from typing Protocols,
    whose ``isinstance`` costs some microseconds each time, and the hot paths ask on every round trip."""
    key = (type(value), kinds)
    known = _KINDS.get(key)
    if known is None:
        known = _KINDS[key] = isinstance(value, kinds)
    return known


def queue_evalsha(pipe: Any, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
    """Queue ``EVALSHA`` on ``pipe``, a plain or a cluster pipeline.

    redis-py's cluster pipeline refuses its ``evalsha`` method, yet routes the raw command by its keys (which share
    one slot in every script of ours), so the raw command is what both kinds get.
    """
    if _is_cluster_pipeline(pipe) and numkeys:
        # Named, its node: else the cluster pipeline asks a node for the keys (COMMAND GETKEYS) on every EVALSHA,
        # always the same node, which then took half again the others' commands. A redirect re-routes it by its keys.
        node = pipe.get_node_from_key(keys_and_args[0])  # type: ignore[no-untyped-call]
        return pipe.execute_command("EVALSHA", sha, numkeys, *keys_and_args, target_nodes=node)  # type: ignore[no-untyped-call]
    return pipe.execute_command("EVALSHA", sha, numkeys, *keys_and_args)


def queue_publish(pipe: Any, channel: str, message: Any) -> Any:
    """Publish on ``pipe``: ``SPUBLISH`` in a cluster (only the channel's shard carries it), else ``PUBLISH``.

    A plain ``PUBLISH`` in a cluster is broadcast to every node over the cluster bus; a sharded channel lives on the
    slot of its name, which for a run's channel is the run's slot.
    """
    if _is_cluster_pipeline(pipe):
        return pipe.execute_command("SPUBLISH", channel, message)  # type: ignore[no-untyped-call]
    return pipe.publish(channel, message)


def script_args(command: Any) -> tuple[Any, ...]:
    """The arguments of one queued pipeline command (plain pipelines keep ``(args, options)``, cluster ones objects)."""
    args = getattr(command, "args", None)
    return tuple(args) if args is not None else tuple(command[0])


def queue_wait(pipe: Any, key: str, replicas: int, timeout_ms: int) -> int:
    """Queue ``WAIT replicas timeout_ms`` on ``pipe`` right after the writes to ``key``'s node; returns its position
    among the pipeline's replies.

    ``WAIT`` covers the writes made before it on the same connection: a cluster pipeline sends each node its commands
    in order on one connection, so the command is named the node of ``key``, where the write before it went.
    """
    if _is_cluster_pipeline(pipe):
        node = pipe.get_node_from_key(key)  # type: ignore[no-untyped-call]
        pipe.execute_command("WAIT", replicas, timeout_ms, target_nodes=node)  # type: ignore[no-untyped-call]
    else:
        pipe.execute_command("WAIT", replicas, timeout_ms)
    return len(pipe) - 1
