"""A distributed orchestrator for multi-step LLM workflows on Celery and Redis.

The public names below are imported on first use (PEP 562), so importing one part of the package (the pure
coordinator, the workflow definitions) does not pull in Celery, Redis or OpenTelemetry.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.agents.tools import ToolContext, tool, tools
    from orchestrator.client import Client
    from orchestrator.definition.registry import function, functions, workflows
    from orchestrator.definition.spec import RetryPolicy, StepSpec, WorkflowSpec, parse_workflow
    from orchestrator.definition.workflow import (
        ApprovalStep,
        LLMStep,
        NoopStep,
        PythonStep,
        Step,
        Workflow,
        WorkflowStep,
    )
    from orchestrator.domain import RunStatus, StepStatus
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
    "WorkflowStep",
    "function",
    "functions",
    "parse_workflow",
    "workflows",
    # agents' tools
    "ToolContext",
    "tool",
    "tools",
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

_ERRORS = "orchestrator.errors"
_HOME = {
    "ApprovalStep": "orchestrator.definition.workflow",
    "LLMStep": "orchestrator.definition.workflow",
    "NoopStep": "orchestrator.definition.workflow",
    "PythonStep": "orchestrator.definition.workflow",
    "Step": "orchestrator.definition.workflow",
    "Workflow": "orchestrator.definition.workflow",
    "WorkflowStep": "orchestrator.definition.workflow",
    "RetryPolicy": "orchestrator.definition.spec",
    "StepSpec": "orchestrator.definition.spec",
    "WorkflowSpec": "orchestrator.definition.spec",
    "parse_workflow": "orchestrator.definition.spec",
    "function": "orchestrator.definition.registry",
    "functions": "orchestrator.definition.registry",
    "workflows": "orchestrator.definition.registry",
    "StepContext": "orchestrator.engine.steps",
    "ToolContext": "orchestrator.agents.tools",
    "tool": "orchestrator.agents.tools",
    "tools": "orchestrator.agents.tools",
    "Client": "orchestrator.client",
    "RunStatus": "orchestrator.domain",
    "StepStatus": "orchestrator.domain",
    "Settings": "orchestrator.infra.settings",
    **{name: _ERRORS for name in __all__ if name.endswith("Error")},
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
