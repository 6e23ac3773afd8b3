"""The in-memory state store: the Lua transitions of ``RedisStateStore`` as Python under one lock.

For tests and single-process use. A run is the same flat field map as the Redis hash (``s:STEP:FIELD``), so
``orchestrator.engine.status.run_view`` reads it unchanged; every transition mirrors its script in ``lua/`` rule for
rule, down to the progress events it emits (``lua/_events.lua``): same types, order, step, attempt and data, numbered
by the run's ``seq`` field. Time comes from an injectable clock, so tests move it instead of sleeping.
"""

from orchestrator.state.memory.children import ChildRuns
from orchestrator.state.memory.control import RunControl
from orchestrator.state.memory.core import EVENTS_MAXLEN, GLOBAL_EVENTS_MAXLEN, MAX_RESEND_BACKOFF
from orchestrator.state.memory.iterations import IterationCheckpoints
from orchestrator.state.memory.journal import AgentJournals
from orchestrator.state.memory.owners import ProcessOwners
from orchestrator.state.memory.steps import StepTransitions

__all__ = ["EVENTS_MAXLEN", "GLOBAL_EVENTS_MAXLEN", "MAX_RESEND_BACKOFF", "MemoryStateStore"]


class MemoryStateStore(RunControl, StepTransitions, IterationCheckpoints, AgentJournals, ChildRuns, ProcessOwners):
    """Run and step state in this process, with the semantics of :class:`~orchestrator.state.RedisStateStore`.

    Args:
        retention_s: How long a finished run is kept.
        clock: Epoch seconds now; the stand-in for Redis's ``TIME`` (inject a fake one to move time in tests).
    """
