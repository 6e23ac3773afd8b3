"""A Jinja sandbox bounded in time and space, for prompt templates and condition expressions.

Jinja's :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` stops attribute escapes and mutation but not
resource exhaustion: ``{{ 'a' * 10**10 }}``, ``{{ 10**10**10 }}``, ``{{ 5|round(-10**9) }}``,
``{{ 'x'|center(10**10) }}`` or nested loops writing into a ``{% set %}`` block would hang or kill the worker.
:class:`BoundedSandbox` adds:

- no value an operator, call or filter makes (string, bytes, list) may pass :data:`MAX_VALUE_CHARS` items, and no
  integer :data:`MAX_INT_BITS` bits; the size is estimated *before* the work is done;
- one render may run at most :data:`MAX_LOOP_ITERATIONS` loop iterations and write at most
  :data:`MAX_OUTPUT_CHARS` characters into its output and its blocks and macros together.
"""

from __future__ import annotations

import inspect
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import wraps
from typing import Any, cast

from jinja2 import StrictUndefined, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import generate_lorem_ipsum
from jinja2.visitor import NodeTransformer

MAX_VALUE_CHARS = 16 * 1024 * 1024
"""No string, bytes or list one operator, call or filter makes may be longer."""
MAX_INT_BITS = 1_000_000
"""No integer an operator makes may be wider (``10**10**10`` would compute for hours)."""
MAX_LOOP_ITERATIONS = 1_000_000
"""Loop iterations one render (or condition) may run, over all its loops."""
MAX_OUTPUT_CHARS = 64 * 1024 * 1024
"""Characters one render may write into its output, blocks and macros together (at least 4x its ``max_chars``)."""
# Arguments counting rows or digits rather than characters: ``batch(10**9, 'x')`` would fill a billion slots.
_MAX_COUNT = 100_000
_MAX_PRECISION = 1000

# What evaluating an expression in a template can raise besides TemplateError. Not ``Exception``: a Celery soft time
# limit arriving mid-render must stay a timeout.
EXPRESSION_ERRORS = (ArithmeticError, AttributeError, LookupError, MemoryError, RuntimeError, TypeError, ValueError)


@dataclass
class _Budget:
    iterations_left: int
    output_left: int


_BUDGET: ContextVar[_Budget | None] = ContextVar("orchestrator_template_budget", default=None)


@contextmanager
def bounded_evaluation(max_chars: int = MAX_VALUE_CHARS) -> Iterator[None]:
    """Give the renders and conditions evaluated inside a fresh loop and output budget."""
    token = _BUDGET.set(_Budget(MAX_LOOP_ITERATIONS, max(MAX_OUTPUT_CHARS, 4 * max_chars)))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _refuse(what: str, size: int, limit: int = MAX_VALUE_CHARS) -> None:
    if size > limit:
        raise SecurityError(f"{what} would make a value of size {size}; a template's limit is {limit}")


def _check_result(value: Any, what: str) -> Any:
    if isinstance(value, str | bytes | list | tuple | dict):
        _refuse(what, len(value))
    return value


def _as_int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) else default


def _longest(values: Iterable[Any]) -> int:
    return max((len(v if isinstance(v, str | bytes) else str(v)) for v in values), default=0)


def _percent_size(fmt: str | bytes, values: Any) -> int:
    """An upper bound on ``fmt % values``: every conversion may print the longest value, padded by its widths."""
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else str(fmt)
    if isinstance(values, Mapping):
        items = list(values.values())
    else:
        items = list(values) if isinstance(values, tuple) else [values]
    widest = max((abs(v) for v in items if isinstance(v, int)), default=0)
    size = len(text)
    for spec in re.finditer(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]", text):
        size += _longest(items) + sum(widest if g == "*" else int(g) for g in spec.groups() if g)
    return size


def _format_size(fmt: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """An upper bound on ``fmt.format(...)``: each field prints the longest value plus the numbers in its spec."""
    values = [*args, *kwargs.values()]
    widest = max((abs(v) for v in values if isinstance(v, int)), default=0)
    size = len(fmt)
    for _, field, spec, _ in string.Formatter().parse(fmt):
        if field is not None:
            numbers = sum(int(n) for n in re.findall(r"\d+", spec or ""))
            size += _longest(values) + numbers + (widest if spec and "{" in spec else 0)
    return size


def _text_method_size(owner: str | bytes, name: str, bound: Mapping[str, Any]) -> int | None:
    """An upper bound on what a ``str``/``bytes`` method returns, for the methods that can grow their input."""
    size = len(owner)
    if name in {"ljust", "rjust", "center", "zfill"}:
        return max(size, _as_int(bound.get("width")))
    if name == "expandtabs":
        tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
        return size + tabs * max(_as_int(bound.get("tabsize"), 8), 0)
    if name == "replace":
        old, new, count = bound.get("old"), bound.get("new"), _as_int(bound.get("count"), -1)
        if not isinstance(old, type(owner)) or not isinstance(new, type(owner)):
            return None
        hits = owner.count(old) if old else size + 1  # type: ignore[arg-type]  # old has owner's type, checked above
        return size + (min(hits, count) if count >= 0 else hits) * max(len(new) - len(old), 0)
    if name == "translate":
        table = bound.get("table")
        values = table.values() if isinstance(table, Mapping) else table if isinstance(table, list | tuple) else ()
        return size * max(_longest(values), 1)
    return None


def _bind(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None  # the call itself will say what is wrong with its arguments
    bound.apply_defaults()
    return dict(bound.arguments)


def _check_call(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Refuse a call whose result would be too large; returns the arguments (an iterable to join, materialised)."""
    target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps ``str.format`` to check its fields
    owner, name = getattr(target, "__self__", None), getattr(target, "__name__", "")
    if isinstance(owner, str | bytes):
        if name == "join" and len(args) == 1:
            items = list(args[0])
            _refuse(f"{name}()", sum(len(i) for i in items if isinstance(i, str | bytes)) + len(owner) * len(items))
            return (items,)
        if name in {"format", "format_map"} and isinstance(owner, str):
            mapping = args[0] if name == "format_map" and args and isinstance(args[0], Mapping) else kwargs
            _refuse(f"{name}()", _format_size(owner, args if name == "format" else (), mapping))
            return args
        bound = _bind(target, args, kwargs)
        size = _text_method_size(owner, name, bound) if bound is not None else None
        if size is not None:
            _refuse(f"{name}()", size)
    elif isinstance(owner, int) and name == "to_bytes":
        bound = _bind(target, args, kwargs)
        _refuse("to_bytes()", _as_int((bound or {}).get("length"), 1))
    return args


def _bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    _refuse("lipsum()", _as_int(n) * _as_int(max) * 16)
    return generate_lorem_ipsum(n, html, min, max)


def _filter_size(name: str, a: Mapping[str, Any]) -> int:
    """An upper bound on a growing filter's result (items or digits); 0 for the harmless ones."""
    text = a.get("s", a.get("value", ""))
    length = len(text) if isinstance(text, str | bytes) else 0
    if name == "center":
        return max(length, _as_int(a.get("width")))
    if name == "indent":
        width = a.get("width")
        per_line = len(width) if isinstance(width, str) else _as_int(width)
        return length + (str(text).count("\n") + 1) * per_line
    if name == "wordwrap":
        wrap = a.get("wrapstring")
        return length * (1 + (len(wrap) if isinstance(wrap, str) else 1))
    if name == "replace":
        size = _text_method_size(str(text), "replace", {"old": str(a.get("old")), "new": str(a.get("new")),
                                                        "count": a.get("count") or -1})  # fmt: skip
        return size or 0
    if name == "format":
        args, kwargs = a.get("args", ()), a.get("kwargs", {})
        return _percent_size(str(text), kwargs or tuple(args))
    # The rest count rows or digits, not characters: they have limits of their own.
    if name in {"batch", "slice"}:
        _refuse(name, _as_int(a.get("linecount", a.get("slices"))), _MAX_COUNT)
    elif name == "round":
        _refuse("round precision", abs(_as_int(a.get("precision"))), _MAX_PRECISION)
    elif name == "tojson":
        indent = a.get("indent")
        _refuse("tojson indent", len(indent) if isinstance(indent, str) else _as_int(indent), _MAX_PRECISION)
    return 0


def _bounded_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)  # keeps Jinja's pass_context / pass_environment marker
    def bounded(*args: Any, **kwargs: Any) -> Any:
        bound = _bind(fn, args, kwargs)
        if bound is not None:
            if name == "sum" and not isinstance(bound.get("start"), int | float):
                raise SecurityError("sum() may only add numbers; use join for strings and lists")
            if name == "join":
                items = list(bound["value"])
                parts = sum(len(i) if isinstance(i, str | bytes) else len(str(i)) for i in items)
                _refuse("join", parts + len(str(bound.get("d", ""))) * len(items))
                args = tuple(items if v is bound["value"] else v for v in args)
                kwargs = {k: items if v is bound["value"] else v for k, v in kwargs.items()}
            _refuse(name, _filter_size(name, bound))
        return _check_result(fn(*args, **kwargs), name)

    return bounded


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
        guarded = {"batch", "center", "format", "indent", "join", "replace", "round", "slice", "sum", "tojson",
                   "wordwrap"}  # fmt: skip
        self.filters.update({name: _bounded_filter(name, self.filters[name]) for name in guarded})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """Refuse an operation whose result would be too large, before computing it."""
        sequences = (str, bytes, list, tuple)
        if operator == "*":
            if isinstance(left, sequences) and isinstance(right, int):
                _refuse("*", len(left) * right)
            elif isinstance(right, sequences) and isinstance(left, int):
                _refuse("*", len(right) * left)
            elif isinstance(left, int) and isinstance(right, int):
                _refuse("*", left.bit_length() + right.bit_length(), MAX_INT_BITS)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            _refuse("**", left.bit_length() * right, MAX_INT_BITS)
        elif operator == "+" and isinstance(left, sequences) and isinstance(right, sequences):
            _refuse("+", len(left) + len(right))
        elif operator == "%" and isinstance(left, str | bytes):
            _refuse("%", _percent_size(left, right))
        return _check_result(super().call_binop(context, operator, left, right), operator)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        """Call an object from the template, refusing calls whose result would be too large."""
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's ``loop(children)`` iterates too
            args = (__self.bounded_iter(args[0]), *args[1:])
        elif getattr(__obj, "__self__", None) is not __self:
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
            yield item

    def bounded_concat(self, parts: tuple[Any, ...]) -> str:
        """``a ~ b ~ …``, refused when the result would be too large."""
        texts = [str(part) for part in parts]
        _refuse("~", sum(len(t) for t in texts))
        return "".join(texts)

    def counted_output(self, value: Any) -> str:
        """One piece of output (to the result, a block or a macro), counted against the render's output budget."""
        text = str(value)
        budget = _BUDGET.get()
        if budget is not None:
            budget.output_left -= len(text)
            if budget.output_left < 0:
                raise SecurityError("the template writes more output than its budget allows (loops over large text?)")
        return text
