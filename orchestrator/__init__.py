"""A distributed orchestrator for multi-step LLM workflows on Celery and Redis."""

from orchestrator.client import Client
from orchestrator.definition.registry import function, functions, workflows
from orchestrator.definition.spec import RetryPolicy, StepSpec, WorkflowSpec, parse_workflow
from orchestrator.definition.workflow import ApprovalStep, LLMStep, NoopStep, PythonStep, Step, Workflow
from orchestrator.engine.steps import StepContext
from orchestrator.errors import (
    CycleError,
    DecisionRefusedError,
    InputValidationError,
    NonRetryableStepError,
    OrchestratorError,
    RetryableStepError,
    RunNotFoundError,
    RunStateError,
    StateError,
    StepError,
    StoreUnavailableError,
    UnknownDependencyError,
    UnknownWorkflowError,
    WorkflowDefinitionError,
)
from orchestrator.infra.settings import Settings
from orchestrator.state import RunStatus, StepStatus

__all__ = [
    # defining workflows
    "ApprovalStep",
    "LLMStep",
    "NoopStep",
    "PythonStep",
    "RetryPolicy",
    "Step",
    "StepContext",
    "StepSpec",
    "Workflow",
    "WorkflowSpec",
    "function",
    "functions",
    "parse_workflow",
    "workflows",
    # running them
    "Client",
    "RunStatus",
    "Settings",
    "StepStatus",
    # errors
    "CycleError",
    "DecisionRefusedError",
    "InputValidationError",
    "NonRetryableStepError",
    "OrchestratorError",
    "RetryableStepError",
    "RunNotFoundError",
    "RunStateError",
    "StateError",
    "StepError",
    "StoreUnavailableError",
    "UnknownDependencyError",
    "UnknownWorkflowError",
    "WorkflowDefinitionError",
]
