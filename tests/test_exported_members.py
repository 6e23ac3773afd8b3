"""The public surface: ``orchestrator.__all__`` is pinned so a name is never added or dropped by accident."""

from __future__ import annotations

import importlib

import pytest

import orchestrator

pytestmark = pytest.mark.timeout(30)

EXPORTED = {
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
}


def test_all_lists_exactly_the_public_names_once_each() -> None:
    assert sorted(orchestrator.__all__) == sorted(EXPORTED)
    assert len(orchestrator.__all__) == len(set(orchestrator.__all__))


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_each_exported_name_is_importable_from_the_package(name: str) -> None:
    module = importlib.import_module("orchestrator")

    member = getattr(module, name)

    defined_in = getattr(member, "__module__", None) or type(member).__module__
    assert defined_in.startswith("orchestrator."), f"{name} comes from {defined_in}"


def test_a_star_import_binds_exactly_the_exported_names() -> None:
    namespace: dict[str, object] = {}
    exec("from orchestrator import *", namespace)

    assert set(namespace) - {"__builtins__"} == EXPORTED


def test_every_exported_error_derives_from_the_one_root() -> None:
    errors = [getattr(orchestrator, n) for n in EXPORTED if n.endswith("Error")]

    assert len(errors) == 14
    assert all(issubclass(e, orchestrator.OrchestratorError) for e in errors)


def test_the_public_names_are_documented() -> None:
    undocumented = [n for n in EXPORTED if not (getattr(orchestrator, n).__doc__ or "").strip()]

    assert undocumented == []
