"""The layers import one way: the pure core pulls in no Celery, kombu, Redis or OpenTelemetry, and nothing in the
library imports the worker package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("celery", "kombu", "redis", "opentelemetry")


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return {name.split(".")[0] for name in out.stdout.split()}


@pytest.mark.parametrize(
    "module",
    ["orchestrator", "orchestrator.engine.coordinator", "orchestrator.definition.spec", "orchestrator.domain"],
)
def test_the_pure_core_imports_no_broker_store_or_tracing_library(module: str) -> None:
    assert _imported_after(f"import {module}") & set(HEAVY) == set()


def test_no_module_of_the_library_imports_the_worker_package() -> None:
    offenders = []
    for path in (ROOT / "orchestrator").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "workers" or n.startswith("workers.") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_the_engine_imports_no_celery() -> None:
    offenders = []
    for path in (ROOT / "orchestrator" / "engine").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            if any(n.split(".")[0] in {"celery", "kombu"} for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def _top_level_imports(path: Path, modules: set[str]) -> set[str]:
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:  # TYPE_CHECKING blocks and lazy imports are not cycles
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found & modules


def test_no_two_modules_import_each_other_even_through_others() -> None:
    paths = {}
    for path in [*(ROOT / "orchestrator").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]:
        parts = path.relative_to(ROOT).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: _top_level_imports(path, set(paths)) - {name} for name, path in paths.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                todo.extend(graph[current])
        return False

    cycles = sorted((a, b) for a in graph for b in graph[a] if reaches(b, a))
    assert cycles == []
