"""Redis URLs, plain or through Sentinel, and the clients, pools and Celery broker settings built from them.

Plain URLs (``redis://``, ``rediss://``, ``unix://``) go to redis-py's ``from_url`` unchanged. A Sentinel URL follows
the ``redis+sentinel://`` convention of redis-sentinel-url, RedisVL, LangChain, Prefect and Docket::

    redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER_NAME[/DB][?OPTION=VALUE&...]
    rediss+sentinel://...     the same over TLS, to the master and to the Sentinels

The hosts are the Sentinels (port 26379 when left out), ``MASTER_NAME`` is the name they monitor the master under,
``DB`` defaults to 0. ``USER``/``PASSWORD`` are the master's (and its replicas'). Options: ``sentinel_username`` and
``sentinel_password`` for Sentinels that require AUTH; with ``rediss+sentinel`` also ``ssl_cert_reqs``,
``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` and ``ssl_check_hostname``, as in a ``rediss://`` URL.

Clients built here ask a Sentinel for the master before each new connection; when a command finds the master gone or
demoted (``READONLY``), redis-py drops the connection and raises ``ConnectionError``, and the next connection goes to
the master the Sentinels name then.

``memory://`` is not a server: it keeps every run in the process that uses it (``MemoryStateStore``), which then
runs the steps itself (:mod:`orchestrator.engine.inprocess`). Anything that is a process of its own (a worker, the
API server, the sweeper service) cannot share that state and refuses it (:func:`require_shared_store`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as asentinel
import redis.sentinel

from orchestrator.errors import OrchestratorError
from orchestrator.infra.redis_pool import QuickReusePool

__all__ = [
    "DEFAULT_SENTINEL_PORT",
    "MEMORY_URL",
    "REDIS_SCHEMES",
    "SENTINEL_SCHEMES",
    "BlockingSentinelConnectionPool",
    "CLUSTER_STATE_SCHEMES",
    "BrokerConnection",
    "RedisUrlError",
    "SentinelUrl",
    "async_client",
    "blocking_pool",
    "broker_connection",
    "check_memory_url",
    "check_url_form",
    "host_port",
    "is_memory_url",
    "is_redis_url",
    "is_sentinel_url",
    "parse_sentinel_url",
    "redact_url",
    "require_shared_store",
    "sync_client",
    "url_options",
    "url_secrets",
]

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_STATE_SCHEMES = frozenset({"redis+cluster", "rediss+cluster"})
"""A Redis Cluster (:mod:`orchestrator.infra.redis_cluster`): for state only, never the broker."""
REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "sentinel", *SENTINEL_SCHEMES})
"""URL schemes of a Redis server (kombu's own ``sentinel://`` included): anything else is another kind of broker."""
DEFAULT_SENTINEL_PORT = 26379
MEMORY_URL = "memory://"
"""``REDIS_URL`` for the single-process backend: state in this process's memory, steps on its own threads."""

SENTINEL_TIMEOUT_S = 5.0
"""Socket timeouts towards a Sentinel: one that does not answer is skipped for the next after this long."""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_REDIS_FORMS = (
    "redis://[:PASSWORD@]HOST:6379/DB, rediss:// (TLS), unix:///PATH/redis.sock, "
    "redis+sentinel://HOST:26379/MASTER_NAME, rediss+sentinel://"
)
_FORMS = {
    "REDIS_URL": f"{_REDIS_FORMS}, redis+cluster://HOST:6379[,HOST:6379]/, rediss+cluster://, memory:// (one process)",
    "ORCH_BROKER_URL": f"amqp://USER:PASSWORD@HOST:5672// (RabbitMQ), amqps://, {_REDIS_FORMS}, or a kombu transport",
}
_EXAMPLE = "redis+sentinel://[:PASSWORD@]HOST:26379[,HOST:26379]/MASTER_NAME[/DB]"
_SSL_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
_AUTH_OPTIONS = ("sentinel_username", "sentinel_password")
_SENTINEL_PASSWORD = re.compile(r"([?&]sentinel_password=)([^&#]*)")


class RedisUrlError(OrchestratorError, ValueError):
    """A Redis URL (``REDIS_URL``, ``ORCH_BROKER_URL``) is malformed; the message names the problem."""


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL.

    Attributes:
        sentinels: ``(host, port)`` of each Sentinel, in the URL's order.
        master_name: The name the Sentinels monitor the master under.
        db: The database number.
        username: The master's ACL user, if any.
        password: The master's password, if any.
        sentinel_username: The Sentinels' ACL user, if any.
        sentinel_password: The Sentinels' password, if any.
        tls: TLS to the master and to the Sentinels (``rediss+sentinel``).
        ssl_options: redis-py ``ssl_*`` connection options, for both.
    """

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    tls: bool = False
    ssl_options: tuple[tuple[str, Any], ...] = ()

    def master_kwargs(self) -> dict[str, Any]:
        """Connection options for the master (redis-py names)."""
        options: dict[str, Any] = {"db": self.db, "username": self.username, "password": self.password}
        if self.tls:
            options.update(ssl=True, **dict(self.ssl_options))
        return options

    def sentinel_kwargs(self) -> dict[str, Any]:
        """Connection options for the Sentinels themselves, short timeouts included."""
        options: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S}
        if self.sentinel_password is not None:
            options.update(username=self.sentinel_username, password=self.sentinel_password)
        if self.tls:
            options.update(ssl=True, **dict(self.ssl_options))
        return options


def is_redis_url(url: str) -> bool:
    """Whether ``url`` (the first, when kombu's ``;``-separated failover list) names a Redis server."""
    first = url.split(";", 1)[0].strip()
    return urlsplit(first).scheme.lower() in REDIS_SCHEMES


def is_memory_url(url: str) -> bool:
    """Whether ``url`` names the single-process backend (``memory://``, with nothing after the scheme)."""
    return url.strip().lower() == MEMORY_URL


def check_memory_url(url: str) -> None:
    """Refuse a ``memory:`` URL that carries anything after its scheme (a host, a path), which would mean nothing.

    Raises:
        RedisUrlError: Naming the URL's form.
    """
    stripped = url.strip()
    if urlsplit(stripped).scheme.lower() == "memory" and not is_memory_url(stripped):
        raise RedisUrlError(f"REDIS_URL={stripped!r}: the single-process backend is exactly {MEMORY_URL!r}")


def check_url_form(url: str, variable: str) -> None:
    """Refuse a ``REDIS_URL`` or ``ORCH_BROKER_URL`` whose scheme is missing or unknown, in one line.

    ``REDIS_URL`` takes the Redis forms and ``memory://``; ``ORCH_BROKER_URL`` takes any broker kombu has a transport
    for (each URL of a ``;``-separated failover list). Without this check redis-py fails at the first connection
    deep in a traceback, and kombu reads ``HOST:PORT`` as an AMQP host name.

    Args:
        url: The URL as given.
        variable: ``REDIS_URL`` or ``ORCH_BROKER_URL``, for the message.

    Raises:
        RedisUrlError: Naming the URL (its password hidden) and the forms accepted.
    """
    broker = variable != "REDIS_URL"
    for part in url.split(";") if broker else [url]:
        match = _SCHEME.match(part.strip())
        scheme = match.group(1).lower() if match else None
        if scheme in REDIS_SCHEMES - {"sentinel"} or (scheme in {"memory", *CLUSTER_STATE_SCHEMES} and not broker):
            continue
        if scheme in CLUSTER_STATE_SCHEMES:
            raise RedisUrlError(
                f"{variable}={redact_url(part.strip())!r}: Celery's Redis transport cannot use a Redis Cluster; "
                "name a plain Redis, a Sentinel URL or RabbitMQ as the broker"
            )
        if broker and scheme is not None and _kombu_transport(scheme):
            continue
        # A scheme-less URL is redacted as if it had one, so a ``:PASSWORD@`` in it is hidden too.
        shown = redact_url(part.strip()) if scheme else redact_url(f"x://{part.strip()}")[4:]
        forms = _FORMS["ORCH_BROKER_URL" if broker else "REDIS_URL"]
        if scheme is None:
            hint = f" (redis://{shown}?)" if not broker and re.fullmatch(r"[\w.-]+(:\d+)?(/\d+)?", shown) else ""
            raise RedisUrlError(f"{variable}={shown!r} has no scheme{hint}; accepted: {forms}")
        raise RedisUrlError(f"{variable}={shown!r}: unknown scheme {scheme}://; accepted: {forms}")


def _kombu_transport(scheme: str) -> bool:
    from kombu.transport import TRANSPORT_ALIASES

    return scheme in TRANSPORT_ALIASES and scheme != "memory"


def require_shared_store(url: str, what: str) -> None:
    """Refuse ``memory://`` for ``what``, a process of its own that must share its state with others.

    Raises:
        RedisUrlError: One line saying why and what to set instead.
    """
    if is_memory_url(url):
        raise RedisUrlError(
            f"REDIS_URL=memory:// keeps runs inside the one process that uses it, so {what} cannot share them: "
            "set REDIS_URL to a Redis server"
        )


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` is a ``redis+sentinel://`` or ``rediss+sentinel://`` URL."""
    return url.strip().lower().startswith(tuple(f"{scheme}://" for scheme in SENTINEL_SCHEMES))


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse a Sentinel URL (the module docstring gives its form).

    Raises:
        RedisUrlError: Naming what is wrong: the scheme, a host or port, the master name, the database, an option.
            The password never appears in the message.
    """
    parts = split_multi_host_url(url, SENTINEL_SCHEMES, "Sentinel")
    master_name, db = _master_and_db(parts.path)
    options = _options(parts.query, parts.tls)
    return SentinelUrl(
        sentinels=_sentinels(parts.hosts),
        master_name=master_name,
        db=db,
        username=parts.username,
        password=parts.password,
        sentinel_username=options.pop("sentinel_username", None),
        sentinel_password=options.pop("sentinel_password", None),
        tls=parts.tls,
        ssl_options=tuple(options.items()),
    )


@dataclass(frozen=True)
class MultiHostUrl:
    """A multi-host URL (Sentinel, cluster) split into its parts, before each kind reads its path and options.

    Attributes:
        tls: Whether the scheme is the ``rediss+`` one.
        username: From the user info, unquoted; ``None`` when absent.
        password: Likewise.
        hosts: The comma-separated ``HOST[:PORT]`` list, as written.
        path: What follows the first ``/`` after the hosts, without the query.
        query: The query string (after the path, or right after the hosts).
    """

    tls: bool
    username: str | None
    password: str | None
    hosts: str
    path: str
    query: str


def split_multi_host_url(url: str, schemes: tuple[str, str], kind: str) -> MultiHostUrl:
    """Split ``url``, whose scheme must be one of ``schemes`` (plain, then TLS), into its parts.

    Raises:
        RedisUrlError: The scheme is not one of ``schemes`` (the message names ``kind``).
    """
    scheme, _, rest = url.strip().partition("://")
    if scheme.lower() not in schemes:
        raise RedisUrlError(f"a {kind} URL starts with {schemes[0]}:// or {schemes[1]}://, not {scheme!r}://")
    netloc, _, path_and_query = rest.partition("/")
    path, _, query = path_and_query.partition("?")
    netloc, _, query_in_netloc = netloc.partition("?")
    userinfo, at, hosts = netloc.rpartition("@")
    # As redis-py reads ``redis://NAME@host``: a name without a colon is a user, not a password.
    user, _, password = userinfo.partition(":") if at else ("", "", "")
    return MultiHostUrl(
        tls=scheme.lower() == schemes[1],
        username=unquote(user) or None,
        password=unquote(password) or None,
        hosts=hosts,
        path=path,
        query=query or query_in_netloc,
    )


def _sentinels(hosts: str) -> tuple[tuple[str, int], ...]:
    if not hosts.strip():
        raise RedisUrlError(f"the Sentinel URL names no Sentinel host; expected {_EXAMPLE}")
    return tuple(host_port(part.strip(), "Sentinel", DEFAULT_SENTINEL_PORT) for part in hosts.split(","))


def host_port(part: str, kind: str, default_port: int) -> tuple[str, int]:
    """``HOST[:PORT]`` or ``[IPV6][:PORT]`` of a multi-host URL, ``default_port`` when none is given.

    Raises:
        RedisUrlError: Naming the ``kind`` of host (``Sentinel``, ``cluster node``) and what is wrong.
    """
    if part.startswith("["):
        host, bracket, tail = part[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise RedisUrlError(f"bad {kind} host {part!r}: an IPv6 address goes in brackets, [::1]:{default_port}")
        port = tail[1:]
    else:
        host, _, port = part.partition(":")
    if not host:
        raise RedisUrlError(f"bad {kind} host {part!r}: empty host name (hosts are separated by single commas)")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise RedisUrlError(f"bad {kind} port in {part!r}: a port is a number from 1 to 65535")
    return host, int(port)


def _master_and_db(path: str) -> tuple[str, int]:
    if "@" in path:
        # Not echoed: the text around a raw '/' in a password is the password.
        raise RedisUrlError(
            "the Sentinel URL has '@' after its hosts: percent-encode '/' (%2F) and '@' (%40) in a password"
        )
    path = path.removesuffix("/")
    parts = [unquote(p) for p in path.split("/")] if path else []
    if not parts or not parts[0]:
        raise RedisUrlError(f"the Sentinel URL names no master: put the monitored name after the hosts, {_EXAMPLE}")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1]):
        raise RedisUrlError(f"the Sentinel URL's path must be /MASTER_NAME or /MASTER_NAME/DB, not /{path}")
    if len(parts) == 1:
        return parts[0], 0
    if not parts[1].isdigit():
        raise RedisUrlError(f"bad database {parts[1]!r} in the Sentinel URL: a database is a number, e.g. /0")
    return parts[0], int(parts[1])


def _options(query: str, tls: bool) -> dict[str, Any]:
    return url_options(query, tls, "Sentinel", "sentinel", _AUTH_OPTIONS)


def url_options(query: str, tls: bool, kind: str, scheme: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The ``?OPTION=VALUE`` of a multi-host URL: ``ssl_*`` (only over TLS) and the ``extra`` names.

    Raises:
        RedisUrlError: An unknown option, or an ``ssl_*`` one without TLS, naming it.
    """
    options: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in _SSL_OPTIONS and not tls:
            raise RedisUrlError(f"option {name} needs TLS: use rediss+{scheme}:// instead of redis+{scheme}://")
        if name not in _SSL_OPTIONS and name not in extra:
            known = ", ".join((*extra, *_SSL_OPTIONS))
            raise RedisUrlError(f"unknown {kind} URL option {name!r}; known: {known}")
        options[name] = value.lower() in {"1", "true", "yes", "on"} if name == "ssl_check_hostname" else value
    return options


def redact_url(url: str) -> str:
    """``url`` with its passwords (the userinfo's and a ``sentinel_password``) replaced by ``***``, for messages."""
    scheme, sep, rest = url.partition("://")
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, at, hosts = rest[:cut].rpartition("@")
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    tail = _SENTINEL_PASSWORD.sub(r"\g<1>***", rest[cut:])
    return f"{scheme}{sep}{userinfo}{at}{hosts}{tail}"


def url_secrets(url: str) -> list[str]:
    """The passwords ``url`` holds (the userinfo's and a ``sentinel_password``), raw and percent-decoded."""
    rest = url.partition("://")[2]
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo = rest[:cut].rpartition("@")[0]
    found = [userinfo.split(":", 1)[1]] if ":" in userinfo else []
    found += [m.group(2) for m in _SENTINEL_PASSWORD.finditer(rest[cut:])]
    return [secret for raw in found if raw for secret in dict.fromkeys((raw, unquote(raw)))]


class BlockingSentinelConnectionPool(redis.sentinel.SentinelConnectionPool, QuickReusePool):
    """Sentinel-discovered master connections in a blocking pool.

    redis-py's ``SentinelConnectionPool`` fails a command with ``Too many connections`` once ``max_connections`` are
    in use; here, as in ``BlockingConnectionPool``, a thread waits up to ``timeout`` seconds for a free one. A
    connection back from a command moments ago is handed out without polling it (:mod:`orchestrator.infra.redis_pool`).
    """


def sync_client(url: str, **options: Any) -> redis.Redis:
    """A redis-py client for ``url``: ``Redis.from_url`` for a plain URL, the Sentinels' master for a Sentinel URL,
    a ``RedisCluster`` for a cluster URL (:mod:`orchestrator.infra.redis_cluster`).

    Args:
        url: A ``redis://``, ``rediss://``, ``unix://`` or Sentinel URL.
        **options: redis-py connection options (``socket_timeout``, ``decode_responses`` …).

    Raises:
        RedisUrlError: A malformed Sentinel URL.
    """
    if _is_cluster(url):
        from orchestrator.infra.redis_cluster import cluster_client

        return cluster_client(url, **options)
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **options)
    parsed = parse_sentinel_url(url)
    master = _sentinel(parsed).master_for(parsed.master_name, **parsed.master_kwargs(), **options)  # type: ignore[no-untyped-call, unused-ignore]
    return cast(redis.Redis, master)


def blocking_pool(url: str, *, max_connections: int, timeout: float, **options: Any) -> redis.ConnectionPool:
    """A connection pool for ``url`` where a thread that finds every connection in use waits for one, and a
    connection back from a command moments ago is handed out without polling it (:mod:`orchestrator.infra.redis_pool`).

    Args:
        url: A ``redis://``, ``rediss://``, ``unix://`` or Sentinel URL.
        max_connections: Connections the pool opens at most.
        timeout: How long a thread waits for a free connection before ``ConnectionError``.
        **options: redis-py connection options.

    Raises:
        RedisUrlError: A malformed Sentinel URL.
    """
    if not is_sentinel_url(url):
        return QuickReusePool.from_url(url, max_connections=max_connections, timeout=timeout, **options)
    parsed = parse_sentinel_url(url)
    manager = _sentinel(parsed)
    kwargs = {**parsed.master_kwargs(), **options, "max_connections": max_connections, "timeout": timeout}
    return BlockingSentinelConnectionPool(parsed.master_name, manager, is_master=True, **kwargs)  # type: ignore[no-untyped-call]


def async_client(url: str, **options: Any) -> aioredis.Redis:
    """An asyncio redis-py client for ``url``, plain, through Sentinel or a cluster (see ``sync_client``).

    Raises:
        RedisUrlError: A malformed Sentinel URL.
    """
    if _is_cluster(url):
        from orchestrator.infra.redis_cluster import async_cluster_client

        return async_cluster_client(url, **options)
    if not is_sentinel_url(url):
        return aioredis.Redis.from_url(url, **options)
    parsed = parse_sentinel_url(url)
    manager = asentinel.Sentinel(parsed.sentinels, sentinel_kwargs=parsed.sentinel_kwargs())  # type: ignore[no-untyped-call, unused-ignore]
    master = manager.master_for(
        parsed.master_name,
        redis_class=aioredis.Redis,
        connection_pool_class=_AsyncSentinelConnectionPool,
        **parsed.master_kwargs(),
        **options,
    )
    return cast(aioredis.Redis, master)


def _is_cluster(url: str) -> bool:
    return urlsplit(url.strip()).scheme.lower() in CLUSTER_STATE_SCHEMES


class _AsyncSentinelConnectionPool(asentinel.SentinelConnectionPool):
    """Closes the connections to the Sentinels with its own (redis-py leaves them to the garbage collector)."""

    async def aclose(self) -> None:
        await super().aclose()
        await self.sentinel_manager.aclose()


def _sentinel(parsed: SentinelUrl) -> redis.sentinel.Sentinel:
    return redis.sentinel.Sentinel(parsed.sentinels, sentinel_kwargs=parsed.sentinel_kwargs())  # type: ignore[no-untyped-call, unused-ignore]


@dataclass(frozen=True)
class BrokerConnection:
    """What Celery needs to reach a broker: its URL, transport options and TLS options.

    Attributes:
        url: The broker URL as kombu reads it.
        transport_options: Extra ``broker_transport_options`` (``master_name`` … for Sentinel).
        use_ssl: ``broker_use_ssl``, or ``None`` to leave TLS to the URL.
    """

    url: str
    transport_options: Mapping[str, Any] = field(default_factory=dict)
    use_ssl: Mapping[str, Any] | None = None


def broker_connection(url: str) -> BrokerConnection:
    """The Celery broker settings for ``url``.

    A Sentinel URL becomes kombu's form: one ``sentinel://[:PASSWORD@]HOST:PORT/DB`` per Sentinel joined by ``;``
    (each carries the master's credentials, since kombu reads them from whichever it connects through), with the
    master name, the Sentinels' credentials and TLS in the transport options. Any other URL is kept as it is.

    Raises:
        RedisUrlError: A malformed Sentinel URL.
    """
    if not is_sentinel_url(url):
        return BrokerConnection(url)
    parsed = parse_sentinel_url(url)
    userinfo = ""
    if parsed.password is not None:
        userinfo = f"{quote(parsed.username or '', safe='')}:{quote(parsed.password, safe='')}@"
    urls = ";".join(f"sentinel://{userinfo}{_netloc(host, port)}/{parsed.db}" for host, port in parsed.sentinels)
    options = {"master_name": parsed.master_name, "sentinel_kwargs": parsed.sentinel_kwargs()}
    # kombu turns TLS on only for a non-empty dict; certificates are verified unless the URL says otherwise.
    use_ssl = {"ssl_cert_reqs": "required", **dict(parsed.ssl_options)} if parsed.tls else None
    return BrokerConnection(urls, options, use_ssl)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
