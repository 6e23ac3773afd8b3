"""The Redis store's agent journals (one hash per agent step, fenced by ``lua/journal.lua``) and run notes."""

from __future__ import annotations

from typing import Any

from orchestrator.domain import Attempt
from orchestrator.state import keys
from orchestrator.state.redis.core import RedisStateCore, _text


class AgentJournals(RedisStateCore):
    """Journal an agent's turns and tool calls under its attempt; read and write the run's shared notes."""

    def record_journal_entry(
        self, attempt: Attempt, entry_id: str, entry_json: str, *, event: str = "", event_data: str = ""
    ) -> bool:
        """Journal an entry (replacing one of the same id); ``False`` when the attempt is stale."""
        run_keys = [
            keys.run_key(attempt.run_id),
            keys.events_key(attempt.run_id),
            keys.agent_journal_key(attempt.run_id, attempt.step),
        ]
        argv: list[Any] = [
            attempt.step,
            attempt.generation,
            attempt.task_id,
            entry_id,
            entry_json,
            self.active_ttl_s,
            event,
            event_data,
        ]
        return bool(self._scripts["journal"](keys=run_keys, args=argv))

    def journal(self, run_id: str, step: str) -> dict[str, str]:
        """Every journal entry of the step, by id (empty when it has none, or the run is gone)."""
        raw = self.client.hgetall(keys.agent_journal_key(run_id, step))
        return {_text(k): _text(v) for k, v in raw.items()}

    def write_note(self, run_id: str, key: str, value_json: str) -> None:
        """Set a note on the run's blackboard (kept as long as a running run is)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(keys.notes_key(run_id), key, value_json)
        pipe.expire(keys.notes_key(run_id), self.active_ttl_s)
        pipe.execute()

    def read_note(self, run_id: str, key: str) -> str | None:
        """A note's JSON, or ``None`` when nobody wrote it."""
        raw = self.client.hget(keys.notes_key(run_id), key)
        return None if raw is None else _text(raw)
