"""The in-memory store's loop checkpoints, as ``lua/iterate.lua``."""

from __future__ import annotations

import json

from orchestrator.domain import Attempt, IterationCheckpoint
from orchestrator.state import keys
from orchestrator.state.base import LOOP_FIELDS, checkpoint_from
from orchestrator.state.memory.core import _COMPACT, MemoryStateCore, _stamp


class IterationCheckpoints(MemoryStateCore):
    """Record and read the latest finished iteration of a repeated step, under the store's lock."""

    def record_iteration(self, attempt: Attempt, checkpoint: IterationCheckpoint) -> bool:
        """Checkpoint a finished iteration; ``False`` when the attempt is stale (see ``lua/iterate.lua``)."""
        p = keys.step_prefix(attempt.step)
        with self._lock:
            now = self._clock()
            run = self._live(attempt.run_id, now)
            if run is None or not self._owns(run.fields, attempt):
                return False
            met = "1" if checkpoint.until_met else ""
            run.fields.update(
                {
                    p + "iterations": str(checkpoint.iteration),
                    p + "until_met": met,
                    p + "loop_key": checkpoint.key,
                    p + "loop_gen": checkpoint.generation,
                    p + "loop_output": json.dumps(checkpoint.output, separators=_COMPACT),
                }
            )
            data = f'{{"iteration":{checkpoint.iteration},"until_met":{"true" if met else "false"}}}'
            number = int(run.fields.get(p + "attempts") or 0)
            self._emit(run, _stamp(now), "step_iteration", attempt.step, attempt=number, data=data)
            return True

    def iteration_checkpoint(self, run_id: str, step: str) -> IterationCheckpoint | None:
        """The step's latest checkpointed iteration, or ``None``."""
        with self._lock:
            run = self._live(run_id, self._clock())
            fields = run.fields if run is not None else {}
            return checkpoint_from([fields.get(keys.step_field(step, f)) for f in LOOP_FIELDS])
