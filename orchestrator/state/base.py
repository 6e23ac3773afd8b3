"""Statuses, transition results and the state-store contract."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class RunStatus(StrEnum):
    """Where a run is in its life (the status JSON's ``status``)."""

    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def finished(self) -> bool:
        """Whether the run has ended."""
        return self in _FINISHED_RUN


_FINISHED_RUN = {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.TIMED_OUT}


class StepStatus(StrEnum):
    """Where a step is in its life (the status JSON's ``steps.*.status``)."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    UPSTREAM_FAILED = "upstream_failed"
    CANCELLED = "cancelled"
    WAITING = "waiting"


class StepOutcome(StrEnum):
    """The final statuses a step attempt can record."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    UPSTREAM_FAILED = "upstream_failed"


@dataclass(frozen=True)
class Attempt:
    """Which delivery of which step: every transition names the attempt it applies to, so a stale one is refused.

    Attributes:
        run_id: The run.
        step: The step's name.
        generation: The run's generation the message was sent in (a resume starts a new one).
        task_id: The Celery task id of the message: the step's current dispatch token.
    """

    run_id: str
    step: str
    generation: str
    task_id: str


@dataclass(frozen=True)
class Claim:
    """The answer to "may this message run an attempt of this step?".

    Attributes:
        outcome: ``ok`` (run it), ``done`` (the step finished already), or why not: ``stale`` (older generation),
            ``superseded`` (re-dispatched under another task id), ``busy`` (another attempt holds a live lease, or
            the step is not released yet), ``inactive`` (the run is not running), ``missing`` (no such run).
        attempt: 1-based number of the attempt now starting.
        now: Redis's clock when the attempt started (epoch seconds).
        errors: Errors of earlier attempts.
        inputs: The run's inputs.
        parent_status: Each dependency's status.
        parent_output: Each dependency's output.
        detail: The finished step's status, or the inactive run's status.
        unclaimed_children: For ``done``: children released but never claimed (their dispatch may have been lost).
    """

    outcome: str
    attempt: int = 0
    now: float = 0.0
    errors: list[dict[str, Any]] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)
    parent_status: dict[str, str] = field(default_factory=dict)
    parent_output: dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    unclaimed_children: tuple[str, ...] = ()


@dataclass(frozen=True)
class Finish:
    """The result of recording a step's final outcome.

    Attributes:
        recorded: ``False`` when the attempt was stale and nothing changed.
        run_status: The run's final status when this step was its last, else ``None``.
        released: Children whose last dependency this was: they are now ``queued`` and must be dispatched.
    """

    recorded: bool
    run_status: str | None = None
    released: tuple[str, ...] = ()
