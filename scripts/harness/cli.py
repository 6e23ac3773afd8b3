"""The command line every benchmark shares: ``--quick``, ``--json PATH``, ``--loglevel`` and the worker options."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from scripts.harness.report import ARTIFACTS


def parser(doc: str | None, *, name: str, quick: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc``, with the options every benchmark has.

    Args:
        doc: The benchmark module's docstring.
        name: The benchmark's name: its results go to ``test-artifacts/NAME.json`` unless ``--json`` says otherwise.
        quick: What ``--quick`` does, for ``--help``.
    """
    parser = argparse.ArgumentParser(prog=f"python -m scripts.{name}", description=(doc or "").split("\n\n")[0] or None)
    parser.add_argument("--quick", action="store_true", help=quick)
    default = ARTIFACTS / f"{name}.json"
    parser.add_argument(
        "--json",
        "--out",
        dest="json",
        type=Path,
        default=default,
        metavar="PATH",
        help=f"JSON results (default {default.relative_to(ARTIFACTS.parent)})",
    )
    parser.add_argument("--loglevel", default="WARNING", help="worker log level (default WARNING)")
    return parser


def add_workers(parser: argparse.ArgumentParser, *, workers: int, concurrency: int, pool: str | None) -> None:
    """``--workers``, ``--concurrency`` and (unless ``pool`` is None) ``--pool``, with these defaults."""
    parser.add_argument("--workers", type=int, default=workers, help=f"worker processes (default {workers})")
    parser.add_argument(
        "--concurrency", type=int, default=concurrency, help=f"pool slots per worker (default {concurrency})"
    )
    if pool is not None:
        parser.add_argument("--pool", default=pool, help=f"prefork, threads, solo, gevent (default {pool})")


def command(module: str, argv: Sequence[str] | None) -> str:
    """The command line that produced a result, for its JSON."""
    return " ".join(["python -m", module, *(sys.argv[1:] if argv is None else argv)])
