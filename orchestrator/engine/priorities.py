"""Step message priorities: a step deeper in its DAG is taken first, so runs in flight finish before new ones start.

A step's *level* runs from 0 (taken last) to :data:`TOP_LEVEL` (taken first): its ``priority`` when the workflow sets
one, else its depth, the longest path from a root to it (:attr:`orchestrator.definition.dag.Graph.depths`), capped
at the top.
Depth from the roots rather than distance to the sinks: every root is level 0 whatever its workflow, so no new run's
first step overtakes a step of a run already started, and a run's level only rises as it progresses; distance to the
sinks would rank the root of a one-step workflow above the middle of a long run already half done.

Brokers disagree on direction, so the level is mapped onto each broker's message priority:

- **Redis** (kombu's emulation): one list per priority step, the queue's own name for 0 and ``QUEUE\\x06\\x16N`` for
  N in 3, 6, 9. A worker's ``BRPOP`` names them in ascending order and Redis pops the first non-empty one, so **0 is
  taken first**: level L is sent as ``(TOP_LEVEL - L) * 3``. A message without priority counts as 0, taken first.
- **AMQP** (RabbitMQ) and the rest: higher is taken first, level L is sent as L. RabbitMQ honours it only on queues
  declared with ``x-max-priority`` (``ORCH_RABBITMQ_PRIORITY_QUEUES``); elsewhere the property is ignored.

Four levels because kombu's default ``priority_steps`` are four lists: producers and consumers of any version of
this project, or plain Celery clients, all read and write the same lists, so no message lands on a list nobody reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.definition.spec import TOP_LEVEL
from orchestrator.infra.redis_url import is_redis_url

if TYPE_CHECKING:
    from orchestrator.definition.spec import WorkflowSpec

__all__ = [
    "REDIS_PRIORITY_SEPARATOR",
    "REDIS_PRIORITY_STEPS",
    "TOP_LEVEL",
    "message_priority",
    "redis_queue_lists",
    "step_level",
]

REDIS_PRIORITY_STEPS = (0, 3, 6, 9)
"""kombu's default ``priority_steps``, pinned in the Celery config: a change of kombu's default cannot strand lists."""

REDIS_PRIORITY_SEPARATOR = "\x06\x16"
"""kombu's default ``sep``: priority N of queue Q lives in the list ``Q + sep + N``."""


def step_level(spec: WorkflowSpec, step: str) -> int:
    """The level of ``step``: its own ``priority`` if set, else its depth capped at :data:`TOP_LEVEL`."""
    own = spec.steps_by_name[step].priority
    if own is not None:
        return own
    return min(spec.graph.depths[step], TOP_LEVEL)


def message_priority(level: int, broker_url: str) -> int:
    """The Celery message ``priority`` that makes ``level`` taken in its place on the broker at ``broker_url``."""
    level = max(0, min(level, TOP_LEVEL))
    if is_redis_url(broker_url):
        return REDIS_PRIORITY_STEPS[TOP_LEVEL - level]
    return level


def redis_queue_lists(queue: str) -> tuple[str, ...]:
    """The Redis lists holding ``queue``'s messages, first-taken first: its length is the sum of theirs."""
    return tuple(queue if step == 0 else f"{queue}{REDIS_PRIORITY_SEPARATOR}{step}" for step in REDIS_PRIORITY_STEPS)
