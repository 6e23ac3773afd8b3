"""Recording every round trip a process makes to Redis, for tests that count them.

A round trip is a pipeline's commands, one command alone, or a lean round trip's commands
(:mod:`orchestrator.infra.redis_roundtrip`); each command is recorded with its arguments.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from redis.client import Pipeline

from orchestrator.infra import redis_roundtrip


@dataclass
class RoundTrips:
    """The round trips made so far, each a list of commands (argument tuples), in order."""

    trips: list[list[tuple[Any, ...]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, commands: list[tuple[Any, ...]]) -> None:
        with self.lock:
            self.trips.append(commands)

    def names(self) -> list[list[str]]:
        """Each round trip's commands by name (a script as ``EVALSHA <sha>``)."""
        return [[_name(c) for c in trip] for trip in self.trips]

    def with_script(self, sha: str) -> list[list[str]]:
        """The round trips (by name) that ran the script ``sha``."""
        return [trip for trip in self.names() if f"EVALSHA {sha}" in trip]

    def after(self, sha: str, key: str | None = None) -> list[list[tuple[Any, ...]]]:
        """The round trips after the last one that ran the script ``sha`` (on ``key``, its first key, if given)."""

        def runs(c: tuple[Any, ...]) -> bool:
            return c[:2] == ("EVALSHA", sha) and (key is None or text(c[3]) == key)

        last = max(i for i, trip in enumerate(self.trips) if any(runs(c) for c in trip))
        return self.trips[last + 1 :]


def text(value: Any) -> str:
    """A reply or argument as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _name(args: tuple[Any, ...]) -> str:
    return f"EVALSHA {args[1]}" if args[0] == "EVALSHA" else str(args[0])


def record_round_trips(monkeypatch: pytest.MonkeyPatch) -> RoundTrips:
    """Record every round trip to Redis from now until ``monkeypatch`` undoes it."""
    recorded = RoundTrips()
    execute, command, lean = Pipeline.execute, redis.Redis.execute_command, redis_roundtrip._round_trip

    def pipeline_execute(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
        recorded.add([tuple(c[0]) for c in self.command_stack])
        return execute(self, *args, **kwargs)

    def execute_command(self: redis.Redis, *args: Any, **kwargs: Any) -> Any:
        recorded.add([args])
        return command(self, *args, **kwargs)

    def lean_round_trip(owner: redis.Redis, commands: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
        recorded.add([tuple(args) for args, _ in commands])
        return lean(owner, commands)

    monkeypatch.setattr(Pipeline, "execute", pipeline_execute)
    monkeypatch.setattr(redis.Redis, "execute_command", execute_command)
    monkeypatch.setattr(redis_roundtrip, "_round_trip", lean_round_trip)
    return recorded
