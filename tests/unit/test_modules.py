"""Which module registers a function a workflow names, found from its name as a file, without importing anything."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from orchestrator.definition.modules import module_of
from orchestrator.definition.registry import FunctionRegistry
from orchestrator.definition.spec import parse_workflow
from orchestrator.definition.validation import check_workflow
from orchestrator.errors import WorkflowDefinitionError

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The current directory holds ``PACKAGE/flows.py``, whose import would leave a marker file; returns PACKAGE."""
    package = f"pkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("open('imported', 'w').close()\n")
    (tmp_path / package / "flows.py").write_text("")
    monkeypatch.chdir(tmp_path)
    return package


def test_the_module_is_the_longest_prefix_that_is_a_file(project: str) -> None:
    assert module_of(f"{project}.flows.shout") == f"{project}.flows"
    assert module_of(f"{project}.flows:shout") == f"{project}.flows"
    assert module_of(f"{project}.other.shout") == project
    assert module_of("nowhere.shout") is None


@pytest.mark.parametrize("name", ["../etc.passwd", "a/b.c", ".hidden.x", "a..b", "a." * 20 + "b"])
def test_a_name_that_is_not_a_short_dotted_path_is_never_looked_up(project: str, name: str) -> None:
    assert module_of(name) is None


def test_the_error_for_an_unregistered_function_names_the_module_to_list_and_imports_nothing(project: str) -> None:
    spec = parse_workflow(
        {"name": "w", "steps": [{"name": "speak", "uses": "python", "with": {"function": f"{project}.flows.shout"}}]}
    )

    with pytest.raises(WorkflowDefinitionError) as refused:
        check_workflow(spec, FunctionRegistry())

    assert str(refused.value) == (
        f"step 'speak': no registered function '{project}.flows.shout'; set ORCH_IMPORTS={project}.flows "
        "(the module that registers it with @orchestrator.function)"
    )
    assert refused.value.step == "speak"
    assert project not in sys.modules
    assert not Path("imported").exists()


def test_an_unregistered_condition_function_gets_the_same_hint(project: str) -> None:
    step = {"name": "maybe", "uses": "noop", "condition_function": f"{project}.flows.when"}
    spec = parse_workflow({"name": "w", "steps": [step]})

    with pytest.raises(WorkflowDefinitionError, match=f"no registered condition function .*ORCH_IMPORTS={project}"):
        check_workflow(spec, FunctionRegistry())
