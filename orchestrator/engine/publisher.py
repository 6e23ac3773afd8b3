"""How the engine sends step messages and interrupts running ones, without knowing the broker.

The engine decides *which* steps to send and under which task ids; a :class:`StepPublisher` turns that into
messages. The Celery implementation (:class:`orchestrator.celery_app.CeleryPublisher`) sends canvas groups; tests
use a recording one. Keeping Celery behind this seam is what lets the attempt lifecycle, run control and the
sweeper be unit-tested against the in-memory store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from orchestrator.definition.spec import WorkflowSpec


class StepPublisher(Protocol):
    """Sends step attempts to workers and interrupts running ones."""

    def publish(
        self,
        spec: WorkflowSpec,
        *,
        run_id: str,
        steps: Sequence[str],
        generation: str,
        task_ids: Mapping[str, str] | None = None,
    ) -> None:
        """Send the steps that became ready together (a group fanning out across workers when several).

        Raises:
            BrokerUnavailableError: The broker did not answer.
        """

    def publish_items(
        self,
        spec: WorkflowSpec,
        *,
        run_id: str,
        step: str,
        generation: str,
        items: Sequence[tuple[int, str]],
        sent_at: float | None = None,
    ) -> None:
        """Send items of a map step, ``(index, task_id)`` each, as one group fanning out across workers.

        ``sent_at`` (epoch seconds, default now) is when the publish of the whole list began, stamped on every
        message alike: a long list is sent a group at a time, all with the first group's stamp.

        Raises:
            BrokerUnavailableError: The broker did not answer.
        """

    def revoke(self, task_ids: Sequence[str]) -> None:
        """Interrupt the attempts running under ``task_ids`` (best effort: a thread pool cannot be interrupted)."""
