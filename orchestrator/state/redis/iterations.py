"""The Redis store's loop checkpoints: each finished iteration of a repeated step, one Lua script."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.domain import Attempt, IterationCheckpoint
from orchestrator.state import keys
from orchestrator.state.base import LOOP_FIELDS, checkpoint_from
from orchestrator.state.redis.core import RedisStateCore, _run_keys, _text


class IterationCheckpoints(RedisStateCore):
    """Record and read the latest finished iteration of a repeated step (see ``lua/iterate.lua``)."""

    def record_iteration(self, attempt: Attempt, checkpoint: IterationCheckpoint) -> bool:
        """Checkpoint a finished iteration; ``False`` when the attempt is stale."""
        argv: list[Any] = [
            attempt.step,
            attempt.generation,
            attempt.task_id,
            checkpoint.iteration,
            "1" if checkpoint.until_met else "",
            checkpoint.key,
            checkpoint.generation,
            json.dumps(checkpoint.output, separators=(",", ":")),
        ]
        return bool(self._scripts["iterate"](keys=_run_keys(attempt.run_id), args=argv))

    def iteration_checkpoint(self, run_id: str, step: str) -> IterationCheckpoint | None:
        """The step's latest checkpointed iteration, or ``None``."""
        row = self.client.hmget(keys.run_key(run_id), [keys.step_field(step, f) for f in LOOP_FIELDS])
        return checkpoint_from([_text(x) if x is not None else None for x in row])
