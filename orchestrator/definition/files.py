"""Reading workflow files (YAML or JSON, one shape for both)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from orchestrator.definition.spec import WorkflowSpec, parse_workflow
from orchestrator.errors import WorkflowDefinitionError

MAX_FILE_BYTES = 2 * 1024 * 1024


def load_workflow_file(path: str | Path) -> WorkflowSpec:
    """Parse and validate a workflow file.

    Raises:
        WorkflowDefinitionError: Unreadable, too large, malformed YAML/JSON (with the line), or an invalid workflow.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise WorkflowDefinitionError(f"cannot read {path}: {exc.strerror}") from None
    if size > MAX_FILE_BYTES:
        raise WorkflowDefinitionError(f"{path} is {size} bytes; the limit is {MAX_FILE_BYTES}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowDefinitionError(f"cannot read {path}: {exc}") from None
    return parse_workflow(parse_document(text, source=str(path)))


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice (PyYAML keeps the last one silently: a second ``steps:`` would
    quietly replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # a list or mapping as a key (``? [a, b]``): PyYAML's own check would come too late
                raise yaml.constructor.ConstructorError(None, None, "unhashable key", key_node.start_mark) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_document(text: str, *, source: str = "<input>") -> Any:
    """Parse YAML (a superset of JSON) with a message that names the line of a syntax error.

    Raises:
        WorkflowDefinitionError: On malformed input.
    """
    try:
        if source.endswith(".json"):
            return json.loads(text)
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except json.JSONDecodeError as exc:
        raise WorkflowDefinitionError(f"{source}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    except RecursionError:
        what = "JSON" if source.endswith(".json") else "YAML"
        raise WorkflowDefinitionError(f"{source}: malformed {what}: nested too deeply") from None
    except ValueError as exc:  # an integer of more digits than Python converts from text (4300)
        what = "JSON" if source.endswith(".json") else "YAML"
        raise WorkflowDefinitionError(f"{source}: malformed {what}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        # One line: some YAML errors (an unacceptable character) span several, naming a position of their own.
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise WorkflowDefinitionError(f"{source}: malformed YAML{where}: {problem}") from None
