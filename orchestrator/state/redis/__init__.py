"""The Redis state store: every transition is one Lua script on the run's own hash."""

from orchestrator.state.redis.children import ChildRuns
from orchestrator.state.redis.control import RunControl
from orchestrator.state.redis.core import CONNECTION_WAIT_S, GLOBAL_EVENTS_MAXLEN, MAX_CONNECTIONS
from orchestrator.state.redis.items import ItemTransitions
from orchestrator.state.redis.iterations import IterationCheckpoints
from orchestrator.state.redis.journal import AgentJournals
from orchestrator.state.redis.owners import ProcessOwners
from orchestrator.state.redis.steps import StepTransitions

__all__ = ["CONNECTION_WAIT_S", "GLOBAL_EVENTS_MAXLEN", "MAX_CONNECTIONS", "RedisStateStore"]


class RedisStateStore(
    RunControl, StepTransitions, IterationCheckpoints, AgentJournals, ChildRuns, ProcessOwners, ItemTransitions
):
    """Run and step state in Redis.

    Args:
        client: A redis-py client (``decode_responses`` off or on, either works).
        retention_s: How long a finished run is kept.
        definition_ttl_s: How long a stored workflow definition lives after its last submit.
    """
