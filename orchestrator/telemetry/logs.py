"""Log lines for operators: JSON (or text) carrying run id, step and attempt, with secrets redacted.

:func:`configure_logging` puts one handler on the root logger, made of three parts:

* :class:`AttemptContextFilter` adds ``run_id``, ``workflow``, ``step``, ``attempt`` and ``task_id`` to every record
  made inside :func:`attempt_context` (the worker wraps each step attempt in it), from a context variable, so it
  works for any logger, any thread pool and any library logging from inside the step.
* A formatter: one JSON object a line (``python-json-logger``), or readable text.
* :class:`Redactor`, applied to the finished line, tracebacks and extra fields included, so that no secret leaves the
  process: the Anthropic API key (``ANTHROPIC_API_KEY``, and anything shaped ``sk-ant-…``), ``Authorization`` and
  ``Bearer`` credentials, the API tokens of ``ORCH_API_TOKENS``, ``?token=`` query values, and passwords in URLs
  (``redis://:PASSWORD@host``), besides the values of a few other secret variables (:meth:`Redactor.from_env`).

``ORCH_LOG_FORMAT`` chooses ``json``, ``text`` or ``auto`` (the default): text when the log goes to a terminal, JSON
when it goes anywhere else (a file, a pipe, a container's log driver). ``ORCH_LOG_LEVEL`` sets the level.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from orchestrator.errors import OrchestratorError
from orchestrator.infra.redis_url import url_secrets

if TYPE_CHECKING:
    from orchestrator.telemetry.records import AttemptInfo

__all__ = [
    "LOG_FORMATS",
    "REDACTED",
    "AttemptContextFilter",
    "JsonLineFormatter",
    "LogConfigError",
    "Redactor",
    "TextLineFormatter",
    "attempt_context",
    "configure_logging",
]

LOG_FORMATS = ("auto", "json", "text")
REDACTED = "[REDACTED]"
ATTEMPT_FIELDS = ("run_id", "workflow", "step", "attempt", "task_id")
_HANDLER_NAME = "orchestrator"

# Literal secrets shorter than this are not searched for (they would blank out ordinary words); the patterns below
# still catch them where they appear as credentials.
MIN_LITERAL_LENGTH = 8

_SECRET_VARS = ("ANTHROPIC_API_KEY", "FLOWER_PASSWORD")
_URL_VARS = ("REDIS_URL", "ORCH_BROKER_URL")
_HEADER_VARS = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS")
_TOKENS_VAR = "ORCH_API_TOKENS"

# A credential not redacted yet, up to whitespace, quotes, a JSON escape or a separator.
_VALUE = r"(?!\[REDACTED\])[^\s\"'\\,;&}\]]+"
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"(?i)(authorization[\"']?\s*[:=]\s*[\"']?(?:[a-z]+\s+)?){_VALUE}"), rf"\g<1>{REDACTED}"),
    (re.compile(rf"(?i)\b(bearer\s+){_VALUE}"), rf"\g<1>{REDACTED}"),
    (re.compile(rf"(?i)(x-api-key[\"']?\s*[:=]\s*[\"']?){_VALUE}"), rf"\g<1>{REDACTED}"),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@\"']*:)[^\s/@\"']+@"), rf"\g<1>{REDACTED}@"),
    (re.compile(rf"(?i)([?&](?:token|access_token|api_key|apikey|\w*password)=){_VALUE}"), rf"\g<1>{REDACTED}"),
    # Last, so a key already hidden as a header value is not matched again.
    (re.compile(r"sk-ant-[A-Za-z0-9_\-]+"), f"sk-ant-{REDACTED}"),
)


class LogConfigError(OrchestratorError):
    """``ORCH_LOG_FORMAT`` or ``ORCH_LOG_LEVEL`` names no known format or level."""


_attempt: ContextVar[Mapping[str, Any] | None] = ContextVar("orchestrator_log_attempt", default=None)


@contextlib.contextmanager
def attempt_context(info: AttemptInfo) -> Iterator[None]:
    """Put the attempt's run id, workflow, step, attempt and task id on every log record made inside."""
    token = _attempt.set(
        {
            "run_id": info.run_id,
            "workflow": info.workflow,
            "step": info.step,
            "attempt": info.attempt,
            "task_id": info.task_id,
        }
    )
    try:
        yield
    finally:
        _attempt.reset(token)


class AttemptContextFilter(logging.Filter):
    """Adds the current step attempt's fields to a record (a record's own ``extra`` of the same name wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate ``record``; never drops it."""
        fields = _attempt.get()
        if fields:
            for name, value in fields.items():
                if not hasattr(record, name):
                    setattr(record, name, value)
        return True


class Redactor:
    """Rewrites text so that known secrets and credential-shaped strings are replaced by ``[REDACTED]``.

    Args:
        literals: Secret values to hide wherever they appear (those shorter than ``MIN_LITERAL_LENGTH`` are
            ignored; the credential patterns still apply to them).
    """

    def __init__(self, literals: Iterable[str] = ()) -> None:
        variants: set[str] = set()
        for value in literals:
            if value and len(value) >= MIN_LITERAL_LENGTH:
                # Also as it reads inside a JSON string, where quotes, backslashes and non-ASCII are escaped.
                variants.update({value, json.dumps(value)[1:-1]})
        ordered = sorted(variants, key=len, reverse=True)
        self._literals = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str], extra: Iterable[str] = ()) -> Redactor:
        """The secrets the environment holds, plus ``extra``.

        Collected: ``ANTHROPIC_API_KEY``, ``FLOWER_PASSWORD``, the tokens (keys) of ``ORCH_API_TOKENS``, the
        passwords in ``REDIS_URL`` and ``ORCH_BROKER_URL``, and the header values of ``OTEL_EXPORTER_OTLP_HEADERS``
        and ``OTEL_EXPORTER_OTLP_TRACES_HEADERS``.
        """
        secrets = [environ.get(name, "") for name in _SECRET_VARS]
        secrets += _api_tokens(environ.get(_TOKENS_VAR, ""))
        for name in _URL_VARS:
            secrets += _url_passwords(environ.get(name, ""))
        for name in _HEADER_VARS:
            secrets += _header_values(environ.get(name, ""))
        return cls([*secrets, *extra])

    def redact(self, text: str) -> str:
        """``text`` with every secret replaced."""
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        if self._literals is not None:
            text = self._literals.sub(REDACTED, text)
        return text


class JsonLineFormatter(JsonFormatter):
    """One JSON object a line: ``timestamp``, ``level``, ``logger``, ``message``, ``pid``, ``process_name``, the
    attempt's fields when inside one, any ``extra``, and ``exc_info`` for exceptions; redacted."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__(
            ["levelname", "name", "message", "process", "processName"],
            rename_fields={"levelname": "level", "name": "logger", "process": "pid", "processName": "process_name"},
            # uvicorn repeats each message with terminal colours as an extra; asyncio's task name (3.12+) is noise.
            reserved_attrs=[*RESERVED_ATTRS, "color_message", "taskName"],
            timestamp=True,
        )
        self.redactor = redactor or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        """The record as one redacted JSON line."""
        data = getattr(record, "data", None)
        if not record.exc_info and isinstance(data, dict) and "traceback" in data:
            # Celery logs an expected task failure (StepFailed, in ``throws``) without a traceback, yet hands the
            # traceback along in its ``data`` extra: keep the line to what it says.
            record = logging.makeLogRecord(
                {**record.__dict__, "data": {k: v for k, v in data.items() if k != "traceback"}}
            )
        return self.redactor.redact(super().format(record))


class TextLineFormatter(logging.Formatter):
    """``TIME LEVEL PROCESS LOGGER [run=… step=… attempt=…]: MESSAGE``, redacted."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)s %(processName)s %(name)s%(attempt_tag)s: %(message)s")
        self.redactor = redactor or Redactor()

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line's first part, with the attempt's tag when the record has one."""
        run_id = getattr(record, "run_id", None)
        tag = f" [run={run_id} step={getattr(record, 'step', '')} attempt={getattr(record, 'attempt', '')}]"
        return self._fmt % {**record.__dict__, "attempt_tag": tag if run_id else ""}  # type: ignore[operator]

    def format(self, record: logging.LogRecord) -> str:
        """The record as redacted text (a traceback on the lines after it)."""
        return self.redactor.redact(super().format(record))


def configure_logging(
    *,
    log_format: str = "auto",
    level: int | str = logging.INFO,
    stream: IO[str] | None = None,
    filename: str | None = None,
    redactor: Redactor | None = None,
) -> logging.Handler:
    """Send every record to one handler on the root logger: attempt fields, the chosen format, redaction.

    Calling it again replaces the handler it installed before and leaves other handlers alone.

    Args:
        log_format: ``json``, ``text`` or ``auto`` (text on a terminal, JSON otherwise; a file is never a terminal).
        level: The root logger's level, as a name (``INFO``) or a number.
        stream: Where to write (default ``sys.stderr``); ignored when ``filename`` is given.
        filename: A file to append to instead.
        redactor: The secrets to hide (default: those of ``os.environ``).

    Returns:
        The handler installed.

    Raises:
        LogConfigError: On an unknown format or level.
    """
    if log_format not in LOG_FORMATS:
        raise LogConfigError(f"ORCH_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    numeric_level = _level(level)
    if redactor is None:
        redactor = Redactor.from_env(os.environ)
    handler: logging.Handler
    if filename:
        handler = logging.FileHandler(filename, encoding="utf-8")
        as_json = log_format != "text"
    else:
        out = stream if stream is not None else sys.stderr
        handler = logging.StreamHandler(out)
        as_json = log_format == "json" or (log_format == "auto" and not _is_terminal(out))
    handler.addFilter(AttemptContextFilter())
    handler.setFormatter(JsonLineFormatter(redactor) if as_json else TextLineFormatter(redactor))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric_level)
    return handler


def _level(level: int | str) -> int:
    if isinstance(level, int):
        return level
    names = logging.getLevelNamesMapping()
    name = level.strip().upper()
    if name.isdigit():
        return int(name)
    if name not in names:
        raise LogConfigError(f"ORCH_LOG_LEVEL must be a level name such as INFO or DEBUG, not {level!r}")
    return names[name]


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _api_tokens(raw: str) -> list[str]:
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return []
    return [token for token in data if isinstance(token, str)] if isinstance(data, dict) else []


def _url_passwords(raw: str) -> list[str]:
    # Kombu accepts several broker URLs separated by ';'.
    return [secret for url in raw.split(";") for secret in url_secrets(url.strip())]


def _header_values(raw: str) -> list[str]:
    return [unquote(part.split("=", 1)[1].strip()) for part in raw.split(",") if "=" in part]
