"""A Jinja sandbox bounded in time and space, for prompt templates and condition expressions.

Jinja's :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` stops attribute escapes and mutation but not
resource exhaustion: ``{{ 'a' * 10**10 }}``, ``{{ 10**10**10 }}``, ``{{ 5|round(-10**9) }}``,
``{{ 'x'|center(10**10) }}`` or nested loops writing into a ``{% set %}`` block would hang or kill the worker.
:class:`BoundedSandbox` sizes every operator, call and filter before it runs, and counts every loop iteration, output
and allocation against the budget of :mod:`orchestrator.definition.budget` (value sizes, loops, output, total
allocation and time); past the allocation or time budget, evaluation raises
:class:`~orchestrator.definition.budget.TemplateLimitError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, cast

from jinja2 import StrictUndefined, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import generate_lorem_ipsum
from jinja2.visitor import NodeTransformer

from orchestrator.definition.budget import (
    _BUDGET,
    MAX_INT_BITS,
    MAX_LOOP_ITERATIONS,
    _afford,
    _as_int,
    _bounded_filter,
    _check_call,
    _check_result,
    _cost,
    _percent_size,
    _refuse,
    _spend,
)

# What evaluating an expression in a template can raise besides TemplateError. Not ``Exception``: a Celery soft time
# limit arriving mid-render must stay a timeout.
EXPRESSION_ERRORS = (ArithmeticError, AttributeError, LookupError, MemoryError, RuntimeError, TypeError, ValueError)


def _bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    _refuse("lipsum()", _as_int(n) * _as_int(max) * 16)
    return generate_lorem_ipsum(n, html, min, max)


class _Bounds(NodeTransformer):
    """Routes every loop, ``~`` concatenation and output through the environment's budget checks."""

    @staticmethod
    def _through(method: str, *args: nodes.Expr, lineno: int | None) -> nodes.Call:
        return nodes.Call(nodes.EnvironmentAttribute(method), list(args), [], None, None, lineno=lineno)

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = self._through("bounded_iter", cast(nodes.Expr, node.iter), lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return self._through("bounded_concat", nodes.Tuple(node.nodes, "load"), lineno=node.lineno)

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [self._through("counted_output", child, lineno=child.lineno) for child in node.nodes]
        return node


class _BoundedCodeGenerator(CodeGenerator):
    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        _Bounds().visit(node)
        node.set_environment(self.environment)
        super().visit_Template(node, frame)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with size, loop and output budgets (see the module docstring)."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(undefined=StrictUndefined, **options)
        self.globals["lipsum"] = _bounded_lipsum
        # Every filter checks the clock and counts what it makes; the growing ones are sized before they run.
        self.filters.update({name: _bounded_filter(name, fn) for name, fn in self.filters.items()})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """Refuse an operation whose result would be too large, or pass the budget, before computing it."""
        sequences = (str, bytes, list, tuple)
        if operator == "*":
            if isinstance(left, sequences) and isinstance(right, int):
                _refuse("*", len(left) * right)
                _afford(_cost(left) * right, "*")
            elif isinstance(right, sequences) and isinstance(left, int):
                _refuse("*", len(right) * left)
                _afford(_cost(right) * left, "*")
            elif isinstance(left, int) and isinstance(right, int):
                _refuse("*", left.bit_length() + right.bit_length(), MAX_INT_BITS)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            _refuse("**", left.bit_length() * right, MAX_INT_BITS)
        elif operator == "+" and isinstance(left, sequences) and isinstance(right, sequences):
            _refuse("+", len(left) + len(right))
            _afford(_cost(left) + _cost(right), "+")
        elif operator == "%" and isinstance(left, str | bytes):
            _refuse("%", _percent_size(left, right))
        return _check_result(super().call_binop(context, operator, left, right), operator)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        """Call an object from the template, refusing calls whose result would be too large."""
        if getattr(__obj, "__self__", None) is __self:
            # The hooks ``_Bounds`` routes loops, ``~`` and output through: they count what they make themselves.
            return __obj(*args)  # without the _loop_vars and _block_vars keywords meant for Context.call
        budget = _BUDGET.get()
        if budget is not None:
            budget.check_time()
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's ``loop(children)`` iterates too
            args = (__self.bounded_iter(args[0]), *args[1:])
        else:
            args = _check_call(__obj, args, kwargs)
        return _check_result(super().call(__context, __obj, *args, **kwargs), "call")

    def bounded_iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """``iterable``, counting each item against the render's loop budget."""
        budget = _BUDGET.get()
        for item in iterable:
            if budget is not None:
                budget.iterations_left -= 1
                if budget.iterations_left < 0:
                    raise SecurityError(f"the template runs more than {MAX_LOOP_ITERATIONS} loop iterations")
                budget.check_time()
            yield item

    def bounded_concat(self, parts: tuple[Any, ...]) -> str:
        """``a ~ b ~ …``, refused when the result would be too large."""
        texts = [str(part) for part in parts]
        size = sum(len(t) for t in texts)
        _refuse("~", size)
        _spend(size, "~")
        return "".join(texts)

    def counted_output(self, value: Any) -> str:
        """One piece of output (to the result, a block or a macro), counted against the render's output budget."""
        text = str(value)
        budget = _BUDGET.get()
        if budget is not None:
            budget.output_left -= len(text)
            if budget.output_left < 0:
                raise SecurityError("the template writes more output than its budget allows (loops over large text?)")
            budget.spend(len(text), "output")
        return text
