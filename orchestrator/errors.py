"""Every exception the orchestrator raises, under one root.

::

    OrchestratorError
    ├── WorkflowDefinitionError        a workflow (file or Python) is not valid
    │   ├── CycleError                 .cycle: the step names around the loop
    │   ├── UnknownDependencyError     .step, .dependency
    │   └── UnknownWorkflowError       .name, .version
    ├── InputValidationError           submitted inputs do not fit the workflow's schema
    ├── StateError                     the state store refused or could not answer
    │   ├── RunNotFoundError           .run_id
    │   ├── DefinitionNotFoundError    .definition_hash: no workflow definition stored under it
    │   ├── RunStateError              the run's status forbids it (.status): resuming a running run …
    │   ├── DecisionRefusedError       an approval decision refused (.reason: not_an_approver | not_waiting)
    │   └── StoreUnavailableError      Redis did not answer
    │       └── BrokerUnavailableError the message broker did not answer
    ├── StepError                      one attempt of a step went wrong
    │   ├── RetryableStepError         .retry_after: the provider's minimum wait, seconds
    │   └── NonRetryableStepError      fails the step at once
    └── StepFailed                     .step: a step failed for good and it is recorded (Celery's FAILURE)

Data lives in fields so callers need not parse messages. Which errors are retried is decided by type alone:
``workers.tasks`` maps ``RetryableStepError`` onto Celery's retry options, nowhere else.
"""

from typing import Any, NotRequired

from typing_extensions import TypedDict


class OrchestratorError(Exception):
    """Root of every error this package raises on purpose."""


class WorkflowDefinitionError(OrchestratorError):
    """A workflow definition is invalid.

    Attributes:
        step: The offending step's name, when one step is to blame.
    """

    def __init__(self, message: str, *, step: str | None = None) -> None:
        super().__init__(message)
        self.step = step


class CycleError(WorkflowDefinitionError):
    """The steps' dependencies form a loop; ``cycle`` lists it, first step repeated at the end."""

    def __init__(self, cycle: list[str]) -> None:
        super().__init__("dependency cycle: " + " -> ".join(cycle), step=cycle[0])
        self.cycle = cycle


class UnknownDependencyError(WorkflowDefinitionError):
    """A step depends on a step that does not exist."""

    def __init__(self, step: str, dependency: str) -> None:
        super().__init__(f"step {step!r} depends on unknown step {dependency!r}", step=step)
        self.dependency = dependency


class UnknownWorkflowError(WorkflowDefinitionError):
    """No workflow is registered under this name (and version)."""

    def __init__(self, name: str, version: int | None = None) -> None:
        what = name if version is None else f"{name} version {version}"
        super().__init__(f"no registered workflow {what!r}")
        self.name = name
        self.version = version


class InputValidationError(OrchestratorError):
    """Submitted inputs do not match the workflow's input schema, or are too large."""


class StateError(OrchestratorError):
    """The state store refused an operation or could not be reached."""


class RunNotFoundError(StateError):
    """No run has this id (it never existed or its retention expired)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"unknown run {run_id!r}")
        self.run_id = run_id


class DefinitionNotFoundError(StateError):
    """No workflow definition is stored under this hash (it expired, or was never saved)."""

    def __init__(self, definition_hash: str) -> None:
        super().__init__(f"unknown definition {definition_hash!r} (it expired, or was never stored)")
        self.definition_hash = definition_hash


class RunStateError(StateError):
    """The run's status forbids the operation (resume a running run, or a resume that lost a race)."""

    def __init__(self, message: str, *, status: str) -> None:
        super().__init__(message)
        self.status = status


class DecisionRefusedError(StateError):
    """A decision on an approval step was refused (it is audited all the same).

    Attributes:
        reason: ``not_an_approver`` or ``not_waiting``.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class StoreUnavailableError(StateError):
    """Redis did not answer at the configured URL."""


class BrokerUnavailableError(StoreUnavailableError):
    """The message broker did not answer: a publish may not have happened (the dispatch hold covers it)."""


class ErrorRecord(TypedDict):
    """A failed attempt as stored in the step's ``errors`` (and ``error``) and shown in the status JSON.

    A ``typing_extensions`` TypedDict so pydantic can describe it (the API's schema) on Python 3.11.

    Attributes:
        type: A short machine-readable name (``rate_limit``, ``timeout``, ``worker_lost``, ``rejected`` …).
        message: What happened, one line.
        status: The provider's HTTP status, or ``None``.
        retryable: Whether another attempt could help.
        attempt: The 1-based attempt that failed (over the run's whole life).
        retry_after: Seconds the provider asked to wait at least, when it said.
        transcript: An agent step's turns and tool calls so far (``max_turns``, a spent budget …).
        child_run_id: The child run whose failure failed a ``workflow`` step.
    """

    type: str
    message: str
    status: NotRequired[int | None]
    retryable: NotRequired[bool]
    attempt: NotRequired[int]
    retry_after: NotRequired[float]
    transcript: NotRequired[dict[str, Any]]
    child_run_id: NotRequired[str]


class DeferralRecord(TypedDict):
    """Why a step waits without failing (stored with it, sent in its ``step_deferred`` event).

    Attributes:
        reason: ``rate_limit`` or ``cooldown``.
        model: The model waited for.
        message: What happened, one line.
    """

    reason: str
    model: str
    message: str


class StepError(OrchestratorError):
    """One attempt of a step failed.

    Attributes:
        kind: A short machine-readable name (``rate_limit``, ``timeout``, ``invalid_output`` …).
        status_code: The provider's HTTP status, when there was one.
    """

    def __init__(self, message: str, *, kind: str = "error", status_code: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status_code = status_code

    def to_record(self) -> ErrorRecord:
        """The JSON-ready form stored in the step's attempt history."""
        return {"type": self.kind, "status": self.status_code, "message": str(self)}


class RetryableStepError(StepError):
    """A transient failure: the attempt may be repeated after a backoff.

    Attributes:
        retry_after: Seconds the provider asked us to wait at least, or ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str = "error",
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, kind=kind, status_code=status_code)
        self.retry_after = retry_after
        # Set by the worker from the step's retry policy just before Celery's autoretry schedules the next attempt.
        self.countdown: float | None = None


class NonRetryableStepError(StepError):
    """A permanent failure: repeating the attempt cannot help."""


class StepDeferred(RetryableStepError):
    """The step must wait before its LLM call (a shared rate limit, or a provider's cool-down) and has failed nothing.

    The worker puts it back in the queue for ``countdown`` seconds without counting an attempt and without holding a
    worker slot (Celery's retry delays the message).

    Attributes:
        reason: ``rate_limit`` (the cluster-wide requests or tokens per minute), or ``cooldown`` (a provider's
            ``retry-after`` for this model).
        model: The model waited for.
    """

    def __init__(self, message: str, *, reason: str, model: str, countdown: float) -> None:
        super().__init__(message, kind="deferred")
        self.reason = reason
        self.model = model
        self.countdown = countdown

    def to_deferral(self) -> DeferralRecord:
        """The deferral as stored with the step and sent in its ``step_deferred`` event."""
        return {"reason": self.reason, "model": self.model, "message": str(self)}


class StepFailed(OrchestratorError):
    """A step failed for good, and that is already recorded: raised last, so Celery marks the task ``FAILURE``.

    Not a :class:`StepError`: nothing is left to decide or retry. The worker's task lists it in ``throws`` (logged as
    one line, no traceback) and acknowledges the message as for any failure, so it is never redelivered.

    Attributes:
        step: The step's name.
    """

    def __init__(self, message: str, *, step: str) -> None:
        super().__init__(message)
        self.step = step

    def __reduce__(self) -> tuple[Any, ...]:
        # Celery pickles the exception between the pool process and the worker (keyword arguments need this).
        return _step_failed, (str(self), self.step)


def _step_failed(message: str, step: str) -> StepFailed:
    return StepFailed(message, step=step)
