"""Run and step state: statuses, key names, the state-store contract and its Redis and in-memory stores."""

from typing import TYPE_CHECKING

from orchestrator.domain import Attempt, Claim, Decision, FinishResult, RunStatus, StepOutcome, StepStatus
from orchestrator.state.base import StateStore
from orchestrator.state.memory import MemoryStateStore
from orchestrator.state.redis import RedisStateStore

if TYPE_CHECKING:
    # mypy proves here that both stores keep the contract, signature for signature.
    _STORES: tuple[type[StateStore], ...] = (RedisStateStore, MemoryStateStore)

__all__ = [
    "Attempt",
    "Claim",
    "Decision",
    "FinishResult",
    "MemoryStateStore",
    "RedisStateStore",
    "RunStatus",
    "StateStore",
    "StepOutcome",
    "StepStatus",
]
