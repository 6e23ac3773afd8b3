"""A private Redis Cluster of ``redis-server`` child processes on loopback, for tests, chaos runs and benchmarks.

Three masters and one replica each by default: six :class:`~orchestrator.dev.redis_server.RedisServer` processes with
``--cluster-enabled yes`` on free ports, joined by ``redis-cli --cluster create``. Each node is stopped by its own
process (never by name); :meth:`RedisClusterServers.kill_master_of` SIGKILLs the master that holds a key, the way a
crashed machine goes, and waits for its replica to take over.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import types
from collections.abc import Iterator

import redis
from redis.crc import key_slot

from orchestrator.dev.redis_server import RedisServer
from orchestrator.errors import StoreUnavailableError

__all__ = ["RedisClusterServers"]

_HOST = "127.0.0.1"
_READY_TIMEOUT_S = 30.0


class RedisClusterServers:
    """``masters`` masters with ``replicas`` replicas each, every node a child ``redis-server``.

    Args:
        masters: Master nodes (at least 3: Redis Cluster refuses fewer).
        replicas: Replicas per master.
        node_timeout_ms: ``cluster-node-timeout``: how long a master may not answer before its replica takes over.
        extra_args: More ``redis-server`` options for every node.
    """

    def __init__(
        self, masters: int = 3, replicas: int = 1, *, node_timeout_ms: int = 2000, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []
        self._args = (
            "--cluster-enabled",
            "yes",
            "--cluster-node-timeout",
            str(node_timeout_ms),
            "--cluster-config-file",
            "nodes.conf",
            # A replica syncs at once rather than after the default 5 s wait for more replicas to share the transfer.
            "--repl-diskless-sync-delay",
            "0",
            *extra_args,
        )

    @property
    def url(self) -> str:
        """``redis+cluster://HOST:PORT,.../`` naming every node still running."""
        hosts = ",".join(f"{_HOST}:{node.port}" for node in self.nodes if node.pid is not None)
        return f"redis+cluster://{hosts}/"

    def start(self) -> RedisClusterServers:
        """Start every node, create the cluster and wait until every node sees it ``ok``.

        Raises:
            StoreUnavailableError: No ``redis-cli``, a node did not start, or the cluster did not form in time.
        """
        cli = shutil.which("redis-cli")
        if cli is None:
            raise StoreUnavailableError("no redis-cli binary: it creates the cluster (apt-get install redis-tools)")
        for _ in range(self.masters * (1 + self.replicas)):
            self.nodes.append(RedisServer(extra_args=self._args).start())
        hosts = [f"{_HOST}:{node.port}" for node in self.nodes]
        create = [cli, "--cluster", "create", *hosts, "--cluster-replicas", str(self.replicas), "--cluster-yes"]
        done = subprocess.run(create, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            self.stop()
            raise StoreUnavailableError(f"redis-cli --cluster create failed: {done.stdout[-500:]} {done.stderr[-500:]}")
        self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = _READY_TIMEOUT_S) -> None:
        """Wait until every running node says ``cluster_state:ok``, every slot has a master that answers and every
        replica has synced with its master (a replica that never synced does not take over when its master dies).

        Raises:
            StoreUnavailableError: Not so after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                states = [self._client(node).cluster("info") for node in self._running()]
                if not all(_field(state, "cluster_state") == "ok" for state in states):
                    last = "cluster_state not ok on every node"
                elif not self._masters_agree():
                    last = "the nodes do not yet agree on the masters"
                elif not self._replicas_synced():
                    last = "a replica has not synced with its master"
                else:
                    return
            except redis.RedisError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise StoreUnavailableError(f"the Redis Cluster did not become ready in {timeout_s:g} s: {last}")

    def master_of(self, key: str) -> RedisServer:
        """The node that is master of ``key``'s slot now.

        Raises:
            LookupError: No running node serves that slot.
        """
        slot = key_slot(key.encode())
        for node in self._running():
            for start, end, master, *_ in self._client(node).cluster("slots"):
                if start <= slot <= end:
                    port = int(master[1])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no master serves slot {slot}")

    def master_ports(self) -> list[int]:
        """The ports of the nodes that are masters now."""
        return sorted({int(row[2][1]) for row in self._client(self._running()[0]).cluster("slots")})

    def kill_master_of(self, key: str) -> RedisServer:
        """SIGKILL the master of ``key``'s slot (its replica is then promoted); returns the node killed."""
        node = self.master_of(key)
        node.kill()
        return node

    def commands_per_node(self) -> dict[int, int]:
        """Commands each running node has processed (``INFO stats``), by port."""
        return {
            node.port: int(self._client(node).info("stats")["total_commands_processed"]) for node in self._running()
        }

    def stop(self) -> None:
        """Stop every node (each by its own process); safe to call twice."""
        for node in self.nodes:
            node.stop()
        self.nodes = []

    def _running(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.pid is not None]

    def _masters_agree(self) -> bool:
        # After a failover every node must name the same masters, all of them alive, for each slot.
        alive = {node.port for node in self._running()}
        views = []
        for node in self._running():
            slots = self._client(node).cluster("slots")
            views.append(sorted((int(row[0]), int(row[2][1])) for row in slots))
        return all(view == views[0] for view in views) and all(port in alive for _, port in views[0])

    def _replicas_synced(self) -> bool:
        for node in self._running():
            replication = self._client(node).info("replication")
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    @staticmethod
    def _client(node: RedisServer) -> redis.Redis:
        return redis.Redis(
            host=_HOST, port=node.port, socket_timeout=2, socket_connect_timeout=2, decode_responses=True
        )

    def __enter__(self) -> RedisClusterServers:
        return self.start() if not self.nodes else self

    def __exit__(self, *exc: type[BaseException] | BaseException | types.TracebackType | None) -> None:
        self.stop()

    def __iter__(self) -> Iterator[RedisServer]:
        return iter(self.nodes)


def _field(info: object, name: str) -> str:
    if isinstance(info, dict):
        return str(info.get(name, ""))
    for line in str(info).splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return ""
