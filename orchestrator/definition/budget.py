"""The size and time budget of one template render or condition, and the size estimates that enforce it.

:class:`~orchestrator.definition.sandbox.BoundedSandbox` checks every operator, call, filter, loop and output against
what is set here:

- no value an operator, call or filter makes (string, bytes, list) may pass :data:`MAX_VALUE_CHARS` items, and no
  integer :data:`MAX_INT_BITS` bits; the size is estimated *before* the work is done;
- one render may run at most :data:`MAX_LOOP_ITERATIONS` loop iterations and write at most
  :data:`MAX_OUTPUT_CHARS` characters into its output and its blocks and macros together;
- one render (or condition) may allocate at most :data:`TEMPLATE_BUDGET_BYTES` over *all* the values it makes, kept
  or not (``{% set ns.l = ns.l + ['x' * 16000000] %}`` in a loop would otherwise keep a gigabyte), lists counted
  by their items (:data:`ITEM_BYTES` each) so ``('x ' * 8000000).split()`` is refused before it is made;
- one render (or condition) may run for at most :data:`TEMPLATE_TIMEOUT_S` seconds, or less when the step's own
  timeout ends sooner: the deadline is checked in every loop iteration, operator, call, filter and output.

The budget of the evaluation under way lives in a context variable set by :func:`bounded_evaluation`; past the
allocation or time budget, evaluation raises :class:`TemplateLimitError`.
"""

from __future__ import annotations

import inspect
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import wraps
from typing import Any

from jinja2.exceptions import SecurityError

MAX_VALUE_CHARS = 16 * 1024 * 1024
"""No string, bytes or list one operator, call or filter makes may be longer."""
MAX_INT_BITS = 1_000_000
"""No integer an operator makes may be wider (``10**10**10`` would compute for hours)."""
MAX_LOOP_ITERATIONS = 1_000_000
"""Loop iterations one render (or condition) may run, over all its loops."""
MAX_OUTPUT_CHARS = 64 * 1024 * 1024
"""Characters one render may write into its output, blocks and macros together (at least 4x its ``max_chars``)."""
TEMPLATE_BUDGET_BYTES = 64 * 1024 * 1024
"""What one render (or condition) may allocate in total: every string, list or dict an operator, call, filter,
``~`` or output makes counts, kept or not (a character counts 1, an item :data:`ITEM_BYTES`)."""
ITEM_BYTES = 64
"""What one item of a list, tuple, set or dict counts against :data:`TEMPLATE_BUDGET_BYTES`: a pointer and a small
object (``'a b'.split()`` makes a string object per item)."""
TEMPLATE_TIMEOUT_S = 5.0
"""Default seconds one render (or condition) may run; the ``ORCH_TEMPLATE_TIMEOUT_S`` setting and a step's own
``timeout_s`` can shorten it."""
# Arguments counting rows or digits rather than characters: ``batch(10**9, 'x')`` would fill a billion slots.
_MAX_COUNT = 100_000
_MAX_PRECISION = 1000


class TemplateLimitError(SecurityError):
    """A render or condition passed its total allocation or time budget (the step fails as ``template_limit``).

    Attributes:
        resource: ``"memory"`` or ``"time"``.
    """

    def __init__(self, message: str, *, resource: str) -> None:
        super().__init__(message)
        self.resource = resource


@dataclass
class _Budget:
    iterations_left: int
    output_left: int
    bytes_left: int
    bytes_total: int
    deadline: float
    """On :func:`time.monotonic`'s clock."""
    seconds: float

    def spend(self, cost: int, what: str) -> None:
        """Count ``cost`` bytes made by ``what`` (and check the clock)."""
        self.bytes_left -= cost
        if self.bytes_left < 0:
            raise TemplateLimitError(
                f"{what}: the template allocates more than its budget of {self.bytes_total} bytes", resource="memory"
            )
        self.check_time()

    def afford(self, cost: int, what: str) -> None:
        """Refuse, before the work is done, to make something that would cost more than what is left."""
        if cost > self.bytes_left:
            raise TemplateLimitError(
                f"{what} would allocate {cost} bytes; the template has {max(self.bytes_left, 0)} of its budget of "
                f"{self.bytes_total} left",
                resource="memory",
            )

    def check_time(self) -> None:
        """Refuse to go on past the deadline."""
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(
                f"the template ran longer than its time limit of {self.seconds:.3g}s", resource="time"
            )


_BUDGET: ContextVar[_Budget | None] = ContextVar("orchestrator_template_budget", default=None)


@contextmanager
def bounded_evaluation(
    max_chars: int = MAX_VALUE_CHARS,
    *,
    budget_bytes: int = TEMPLATE_BUDGET_BYTES,
    timeout_s: float = TEMPLATE_TIMEOUT_S,
    deadline: float | None = None,
) -> Iterator[None]:
    """Give the renders and conditions evaluated inside fresh loop, output, allocation and time budgets.

    Args:
        max_chars: The longest text the caller will accept; output and allocation budgets are at least a few times it.
        budget_bytes: The allocation budget (see :data:`TEMPLATE_BUDGET_BYTES`).
        timeout_s: Seconds evaluation may run from now.
        deadline: A :func:`time.monotonic` time evaluation must end by anyway (the step's own timeout).
    """
    now = time.monotonic()
    end = now + timeout_s if deadline is None else min(now + timeout_s, deadline)
    allowed = max(budget_bytes, 2 * max_chars)
    budget = _Budget(MAX_LOOP_ITERATIONS, max(MAX_OUTPUT_CHARS, 4 * max_chars), allowed, allowed, end, end - now)
    token = _BUDGET.set(budget)
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _cost(value: Any) -> int:
    """What a value counts against the allocation budget (its items, not what they point to, for containers)."""
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, list | tuple | dict | set | frozenset):
        return len(value) * ITEM_BYTES
    if isinstance(value, int):
        return value.bit_length() // 8
    return 0


def _spend(cost: int, what: str) -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.spend(cost, what)


def _afford(cost: int, what: str) -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.afford(cost, what)


# What ``str.split()`` splits on; ``str.splitlines()`` on the line-breaking ones. Beyond ASCII a string is bounded by
# its length instead: counting every Unicode space would cost more than the split.
_ASCII_SPACES = (" ", "\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f")
_ASCII_LINE_BREAKS = ("\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e")


def _split_items(text: str | bytes, sep: Any, maxsplit: int = -1, *, lines: bool = False) -> int:
    """An upper bound on the number of items ``text.split(sep)`` (or ``splitlines``) makes, counted at C speed."""
    if isinstance(sep, str | bytes) and sep:
        hits = text.count(sep)  # type: ignore[arg-type]  # a str/bytes mismatch raises in the split itself
    elif isinstance(text, bytes):
        hits = sum(text.count(c.encode()) for c in (_ASCII_LINE_BREAKS[:2] if lines else _ASCII_SPACES[:6]))
    elif text.isascii():
        hits = sum(text.count(c) for c in (_ASCII_LINE_BREAKS if lines else _ASCII_SPACES))
    else:
        hits = len(text)
    return (min(hits, maxsplit) if maxsplit >= 0 else hits) + 1


def _refuse(what: str, size: int, limit: int = MAX_VALUE_CHARS) -> None:
    if size > limit:
        raise SecurityError(f"{what} would make a value of size {size}; a template's limit is {limit}")


def _check_result(value: Any, what: str) -> Any:
    """``value``, refused past the size of one value, and counted against the allocation budget."""
    if isinstance(value, str | bytes | list | tuple | dict):
        _refuse(what, len(value))
    _spend(_cost(value), what)
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
        if name in {"split", "rsplit", "splitlines"} and bound is not None:
            lines = name == "splitlines"
            parts = _split_items(owner, bound.get("sep"), _as_int(bound.get("maxsplit"), -1), lines=lines)
            _afford(parts * ITEM_BYTES + len(owner), f"{name}()")
        size = _text_method_size(owner, name, bound) if bound is not None else None
        if size is not None:
            _refuse(f"{name}()", size)
    elif isinstance(owner, int) and name == "to_bytes":
        bound = _bind(target, args, kwargs)
        _refuse("to_bytes()", _as_int((bound or {}).get("length"), 1))
    return args


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
        size = _text_method_size(
            str(text), "replace", {"old": str(a.get("old")), "new": str(a.get("new")), "count": a.get("count") or -1}
        )
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


# Filters whose result has up to one item per item (or character) of their value: checked against what is left of the
# allocation budget before they run, as ``('x' * 16000000)|sort`` would make 16 M items and sort them for seconds.
_ITEMIZING_FILTERS = frozenset({"batch", "dictsort", "groupby", "items", "list", "reverse", "slice", "sort", "unique"})
# Filters splitting their text into words or lines on the way.
_SPLITTING_FILTERS = frozenset({"indent", "urlize", "wordcount", "wordwrap"})
# Filters whose arguments can grow their result past its input: sized (or limited) before they run.
_GUARDED_FILTERS = frozenset(
    {"batch", "center", "format", "indent", "join", "replace", "round", "slice", "sum", "tojson", "wordwrap"}
)


def _bounded_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    # Jinja passes the context, eval context or environment before the value to filters marked for it.
    value_at = 0 if getattr(fn, "jinja_pass_arg", None) is None else 1
    guarded = name in _GUARDED_FILTERS

    @wraps(fn)  # keeps Jinja's pass_context / pass_environment marker
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None and len(args) > value_at:
            budget.check_time()
            value = args[value_at]
            if name in _ITEMIZING_FILTERS and isinstance(value, Sized):
                budget.afford(len(value) * ITEM_BYTES, name)
            elif name in _SPLITTING_FILTERS and isinstance(value, str):
                budget.afford(_split_items(value, None) * ITEM_BYTES, name)
        if guarded:
            args, kwargs = _check_filter(name, fn, args, kwargs)
        return _check_result(fn(*args, **kwargs), name)

    return bounded


def _check_filter(
    name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Refuse a growing filter whose result would be too large; returns its arguments (an iterable to join,
    materialised)."""
    bound = _bind(fn, args, kwargs)
    if bound is None:
        return args, kwargs
    if name == "sum" and not isinstance(bound.get("start"), int | float):
        raise SecurityError("sum() may only add numbers; use join for strings and lists")
    if name == "join":
        items = list(bound["value"])
        parts = sum(len(i) if isinstance(i, str | bytes) else len(str(i)) for i in items)
        _refuse("join", parts + len(str(bound.get("d", ""))) * len(items))
        args = tuple(items if v is bound["value"] else v for v in args)
        kwargs = {k: items if v is bound["value"] else v for k, v in kwargs.items()}
    _refuse(name, _filter_size(name, bound))
    return args, kwargs
