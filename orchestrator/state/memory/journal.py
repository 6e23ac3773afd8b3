"""The in-memory store's agent journals and run notes, as ``lua/journal.lua`` and the Redis store's notes."""

from __future__ import annotations

from orchestrator.domain import Attempt
from orchestrator.state import keys
from orchestrator.state.memory.core import MemoryStateCore, _stamp


class AgentJournals(MemoryStateCore):
    """Journal an agent's turns and tool calls under its attempt; the run's shared notes; under the store's lock."""

    def record_journal_entry(
        self, attempt: Attempt, entry_id: str, entry_json: str, *, event: str = "", event_data: str = ""
    ) -> bool:
        """Journal an entry (replacing one of the same id); ``False`` when the attempt is stale."""
        with self._lock:
            now = self._clock()
            run = self._live(attempt.run_id, now)
            if run is None or not self._owns(run.fields, attempt):
                return False
            run.side.setdefault(keys.agent_journal_key(attempt.run_id, attempt.step), {})[entry_id] = entry_json
            if event:
                number = int(run.fields.get(keys.step_field(attempt.step, "attempts")) or 0)
                self._emit(run, _stamp(now), event, attempt.step, attempt=number, data=event_data)
            return True

    def journal(self, run_id: str, step: str) -> dict[str, str]:
        """Every journal entry of the step, by id."""
        with self._lock:
            run = self._live(run_id, self._clock())
            return dict(run.side.get(keys.agent_journal_key(run_id, step), {})) if run is not None else {}

    def write_note(self, run_id: str, key: str, value_json: str) -> None:
        """Set a note on the run's blackboard (nothing happens when the run is gone)."""
        with self._lock:
            run = self._live(run_id, self._clock())
            if run is not None:
                run.side.setdefault(keys.notes_key(run_id), {})[key] = value_json

    def read_note(self, run_id: str, key: str) -> str | None:
        """A note's JSON, or ``None``."""
        with self._lock:
            run = self._live(run_id, self._clock())
            return run.side.get(keys.notes_key(run_id), {}).get(key) if run is not None else None
