"""Run and step state: statuses, key names, and the Redis store."""

from orchestrator.state.base import Attempt, Claim, Finish, RunStatus, StepOutcome, StepStatus
from orchestrator.state.redis import RedisStateStore

__all__ = ["Attempt", "Claim", "Finish", "RedisStateStore", "RunStatus", "StepOutcome", "StepStatus"]
