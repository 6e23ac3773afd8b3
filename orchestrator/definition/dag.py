"""Pure graph functions over a workflow's dependency edges: no I/O, no Celery, no Redis."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property


def find_cycle(dependencies: Mapping[str, Sequence[str]]) -> list[str] | None:
    """Find one dependency cycle.

    Args:
        dependencies: Each step name mapped to the names it depends on (all must be keys).

    Returns:
        The cycle as a path that starts and ends on the same step (``["a", "b", "a"]``), or ``None``.
    """
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(dependencies, white)
    for start in dependencies:
        if colour[start] != white:
            continue
        # Iterative DFS so a 10,000-step chain cannot hit the recursion limit.
        path: list[str] = [start]
        stack: list[Iterator[str]] = [iter(dependencies[start])]
        colour[start] = grey
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                colour[path.pop()] = black
                stack.pop()
                continue
            if colour[nxt] == grey:
                cycle = [*path[path.index(nxt) :], nxt]
                # Report it in execution order (dependency first), the way a reader follows arrows.
                cycle.reverse()
                return cycle
            if colour[nxt] == white:
                colour[nxt] = grey
                path.append(nxt)
                stack.append(iter(dependencies[nxt]))
    return None


@dataclass(frozen=True)
class Graph:
    """The dependency graph of one workflow.

    Attributes:
        parents: Each step mapped to the steps it depends on, in declaration order.
    """

    parents: Mapping[str, tuple[str, ...]]

    @classmethod
    def from_dependencies(cls, dependencies: Mapping[str, Sequence[str]]) -> Graph:
        """Build a graph from ``{step: [dependencies]}`` (validated elsewhere: no cycles, no unknown names)."""
        return cls({name: tuple(deps) for name, deps in dependencies.items()})

    @cached_property
    def children(self) -> Mapping[str, tuple[str, ...]]:
        """Each step mapped to the steps that depend on it, in declaration order."""
        out: dict[str, list[str]] = {name: [] for name in self.parents}
        for name, deps in self.parents.items():
            for dep in deps:
                out[dep].append(name)
        return {name: tuple(kids) for name, kids in out.items()}

    @cached_property
    def roots(self) -> tuple[str, ...]:
        """Steps with no dependencies."""
        return tuple(name for name, deps in self.parents.items() if not deps)

    @cached_property
    def topological_order(self) -> tuple[str, ...]:
        """Every step after all of its dependencies (Kahn's algorithm, stable in declaration order)."""
        remaining = {name: len(deps) for name, deps in self.parents.items()}
        ready = [name for name in self.parents if remaining[name] == 0]
        order: list[str] = []
        while ready:
            name = ready.pop(0)
            order.append(name)
            for child in self.children[name]:
                remaining[child] -= 1
                if remaining[child] == 0:
                    ready.append(child)
        return tuple(order)

    @cached_property
    def depths(self) -> Mapping[str, int]:
        """Each step mapped to its depth: the number of edges on the longest path from a root to it (roots are 0).

        A join is as deep as its deepest parent plus one, so depth only grows as a run progresses.
        """
        depth: dict[str, int] = {}
        for name in self.topological_order:
            depth[name] = max((depth[p] + 1 for p in self.parents[name]), default=0)
        return depth

    def descendants(self, step: str) -> set[str]:
        """Every step that depends on ``step``, directly or transitively."""
        seen: set[str] = set()
        frontier = list(self.children[step])
        while frontier:
            name = frontier.pop()
            if name not in seen:
                seen.add(name)
                frontier.extend(self.children[name])
        return seen

    def ancestors(self, step: str) -> set[str]:
        """Every step ``step`` depends on, directly or transitively."""
        seen: set[str] = set()
        frontier = list(self.parents[step])
        while frontier:
            name = frontier.pop()
            if name not in seen:
                seen.add(name)
                frontier.extend(self.parents[name])
        return seen

    def critical_path_length(self, duration: Mapping[str, float]) -> float:
        """The longest sum of ``duration`` along any dependency path (the best possible makespan)."""
        finish: dict[str, float] = {}
        for name in self.topological_order:
            start = max((finish[p] for p in self.parents[name]), default=0.0)
            finish[name] = start + duration[name]
        return max(finish.values(), default=0.0)
