"""Workflow files are read within bounds: no alias bomb, no endless device, no FIFO without a writer."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.definition.files import MAX_YAML_NODES, load_workflow_file
from orchestrator.errors import WorkflowDefinitionError


def alias_bomb(levels: int = 8, fan_out: int = 10) -> str:
    """A small document whose aliases expand to ``fan_out ** (levels + 1)`` scalars (10^9 for the defaults)."""
    lines = ["name: bomb", "a0: &a0 [" + ",".join(["x"] * fan_out) + "]"]
    lines += [f"a{level}: &a{level} [" + ",".join([f"*a{level - 1}"] * fan_out) + "]" for level in range(1, levels + 1)]
    lines.append(f"steps: [{{name: s, uses: noop, with: {{v: *a{levels}}}}}]")
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(10)
def test_an_alias_bomb_is_refused_in_one_line_before_it_is_expanded(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert path.stat().st_size < 600

    with pytest.raises(WorkflowDefinitionError) as caught:
        load_workflow_file(path)

    assert f"more than {MAX_YAML_NODES} nodes" in str(caught.value)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_anchors_and_aliases_within_the_node_limit_still_load(tmp_path: Path) -> None:
    path = tmp_path / "shared.yaml"
    path.write_text(
        "name: shared\n"
        "steps:\n"
        "  - {name: first, uses: noop, retry: &retry {max_attempts: 2}}\n"
        "  - {name: second, uses: noop, retry: *retry, depends_on: [first]}\n"
    )

    spec = load_workflow_file(path)

    assert [step.name for step in spec.steps] == ["first", "second"]


@pytest.mark.timeout(10)
def test_a_fifo_is_refused_naming_it_without_waiting_for_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "workflow.yaml"
    os.mkfifo(path)

    with pytest.raises(WorkflowDefinitionError, match="FIFO") as caught:
        load_workflow_file(path)

    assert str(path) in str(caught.value)


def _limit_memory() -> None:  # so that old code, reading /dev/zero until MemoryError, cannot take the machine's
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.mark.timeout(60)
def test_validate_on_a_symlink_to_dev_zero_is_refused_in_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "workflow.yaml"
    path.symlink_to("/dev/zero")
    command = [sys.executable, "-c", "from orchestrator.cli import main; main()", "validate", str(path)]

    done = subprocess.run(command, capture_output=True, text=True, timeout=50, preexec_fn=_limit_memory, check=False)

    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"error: cannot read {path}: it is a character device, not a regular file"
    ]
