"""Reading workflow files (YAML or JSON, one shape for both)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Final

import yaml

from orchestrator.definition.spec import WorkflowSpec, parse_workflow
from orchestrator.errors import WorkflowDefinitionError

MAX_FILE_BYTES: Final = 2 * 1024 * 1024
"""The largest workflow file read; at most one byte more is ever read, whatever the file claims to be."""
MAX_YAML_NODES: Final = 100_000
"""The most nodes a YAML document may hold once its aliases are expanded. 2,000 steps of ~15 nodes each fit; an alias
bomb (each level ten aliases of the one before: some 500 bytes for 10^9 nodes) is refused before it is built, since
validating, hashing or printing it would visit every expanded node."""
_FILE_KINDS: Final = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


def load_workflow_file(path: str | Path) -> WorkflowSpec:
    """Parse and validate a workflow file.

    Raises:
        WorkflowDefinitionError: Unreadable, too large, malformed YAML/JSON (with the line), or an invalid workflow.
    """
    path = Path(path)
    try:
        text = _read_regular_file(path).decode("utf-8")
    except OSError as exc:
        raise WorkflowDefinitionError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise WorkflowDefinitionError(f"cannot read {path}: {exc}") from None
    return parse_workflow(parse_document(text, source=str(path)))


def _read_regular_file(path: Path) -> bytes:
    """Read at most ``MAX_FILE_BYTES + 1`` bytes, and only from a regular file (``/dev/zero`` never ends).

    Raises:
        OSError: When the file cannot be opened.
        WorkflowDefinitionError: Not a regular file, or larger than the limit.
    """
    # Non-blocking, so opening a FIFO without a writer returns at once; the type is checked on the open descriptor,
    # so the path cannot be swapped for something else in between.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
            raise WorkflowDefinitionError(f"cannot read {path}: it is {kind}, not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise WorkflowDefinitionError(f"{path} is {info.st_size} bytes; the limit is {MAX_FILE_BYTES}")
        with open(fd, "rb", closefd=False) as file:
            data = file.read(MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:  # it grew after the check
        raise WorkflowDefinitionError(f"{path} is more than {MAX_FILE_BYTES} bytes; the limit is {MAX_FILE_BYTES}")
    return data


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

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            _check_expanded_size(node)
        return node


def _check_expanded_size(root: yaml.Node) -> None:
    """Refuse a document of more than ``MAX_YAML_NODES`` nodes counting every alias as a copy of its anchor.

    Each distinct node is visited once (an alias is the anchored node object itself), so this is linear in the
    text, however many nodes the aliases expand to.

    Raises:
        yaml.constructor.ConstructorError: Too many nodes, or an alias inside its own anchor.
    """
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes and sizes[id(node)] > 0:
            continue
        children = _children(node)
        if children_done:
            sizes[id(node)] = size = 1 + sum(sizes[id(child)] for child in children)
            if size > MAX_YAML_NODES:
                problem = f"more than {MAX_YAML_NODES} nodes once aliases are expanded (an alias bomb?)"
                raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark)
            continue
        if id(node) in sizes:  # entered, not finished: the node contains itself
            raise yaml.constructor.ConstructorError(None, None, "an alias refers to its own anchor", node.start_mark)
        sizes[id(node)] = 0
        stack.append((node, True))
        stack.extend((child, False) for child in children if sizes.get(id(child), 0) == 0)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


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
