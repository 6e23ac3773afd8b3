"""Log lines: JSON or text, the step attempt's fields inside an attempt, and no secret in any line."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.telemetry import AttemptInfo
from orchestrator.telemetry.logs import (
    REDACTED,
    LogConfigError,
    Redactor,
    attempt_context,
    configure_logging,
)

API_KEY = "sk-ant-api03-" + "S3cr3t" * 8
TOKEN = "write-token-7f3e9a1c"
PASSWORD = "broker-pa55word"
ENV = {
    "ANTHROPIC_API_KEY": API_KEY,
    "ORCH_API_TOKENS": json.dumps({TOKEN: {"principal": "ci", "scopes": ["read", "write"]}}),
    "REDIS_URL": f"redis://:{PASSWORD}@redis:6379/0",
    "OTEL_EXPORTER_OTLP_HEADERS": "x-honeycomb-team=hc-team-key-123456",
}
INFO = AttemptInfo("a" * 32, "digest", "summarise", "llm", 2, "task-9", "llm", queued_at=1.0, started_at=2.0)

log = logging.getLogger("tests.unit.test_logs")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def configure(log_format: str = "json", **kwargs: Any) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(log_format=log_format, stream=stream, redactor=Redactor.from_env(ENV), **kwargs)
    return stream


def test_records_inside_an_attempt_carry_run_id_step_and_attempt_and_others_do_not() -> None:
    stream = configure()

    with attempt_context(INFO):
        log.info("calling the model")
        logging.getLogger("httpx").info("HTTP Request: POST /v1/messages")
    log.info("between steps")

    inside, library, outside = json_lines(stream)
    expected = {"run_id": "a" * 32, "workflow": "digest", "step": "summarise", "attempt": 2, "task_id": "task-9"}
    assert {k: inside[k] for k in expected} == expected
    assert {k: library[k] for k in expected} == expected, "any logger inside the attempt gets the fields"
    assert not set(expected) & set(outside)
    assert outside["message"] == "between steps"
    assert {"timestamp", "level", "logger", "pid", "process_name"} <= set(outside)


def test_an_expected_task_failure_is_one_line_without_the_traceback_celery_hands_along() -> None:
    stream = configure(level=logging.INFO)
    trace = logging.getLogger("celery.app.trace")
    context = {"id": "t1", "exc": "StepFailed(\"step 'a' failed: bad_request\")", "traceback": "Traceback (most..."}

    trace.info("Task %(id)s raised expected: %(exc)s", context, extra={"data": context})

    [line] = json_lines(stream)
    assert line["message"] == "Task t1 raised expected: StepFailed(\"step 'a' failed: bad_request\")"
    assert line["data"] == {"id": "t1", "exc": context["exc"]}
    assert "Traceback" not in stream.getvalue()


def test_the_attempt_context_belongs_to_its_own_thread() -> None:
    stream = configure()

    with attempt_context(INFO):
        thread = threading.Thread(target=log.info, args=("another thread",))
        thread.start()
        thread.join()

    assert "run_id" not in json_lines(stream)[0]


@pytest.mark.parametrize(
    ("message", "secret"),
    [
        (f"calling with key {API_KEY}", API_KEY),
        ("a key shaped like Anthropic's: sk-ant-api03-unlisted_Key-123", "unlisted_Key-123"),
        ("headers: {'Authorization': 'Bearer some-other-bearer-token'}", "some-other-bearer-token"),
        (f"token {TOKEN} refused", TOKEN),
        ("GET /runs/1/events?token=query-token-abcdef&after=3", "query-token-abcdef"),
        (f"connecting to redis://:{PASSWORD}@redis:6379/0", PASSWORD),
        ("broker amqp://guest:short@rabbit:5672//", "short"),
        ("x-api-key: key-in-a-header-0001", "key-in-a-header-0001"),
        ("exporting with hc-team-key-123456", "hc-team-key-123456"),
    ],
)
@pytest.mark.parametrize("log_format", ["json", "text"])
def test_secrets_never_reach_a_log_line(message: str, secret: str, log_format: str) -> None:
    stream = configure(log_format)

    log.warning(message)
    log.warning("as an argument: %s", message)
    log.info("as an extra field", extra={"detail": {"nested": message}})
    try:
        raise RuntimeError(message)
    except RuntimeError:
        log.exception("as an exception")

    output = stream.getvalue()
    assert secret not in output
    # Text lines leave extra fields out; JSON lines carry them.
    assert output.count(REDACTED) >= (4 if log_format == "json" else 3)


def test_a_token_with_characters_json_escapes_is_redacted_in_json_too() -> None:
    token = 'quote"and\\slash-token-1'
    stream = io.StringIO()
    configure_logging(log_format="json", stream=stream, redactor=Redactor([token]))

    log.warning("token %s", token)

    assert json_lines(stream)[0]["message"] == f"token {REDACTED}"


def test_short_literals_are_left_alone_so_words_survive_while_patterns_still_catch_them() -> None:
    redactor = Redactor.from_env({"REDIS_URL": "redis://:pass@redis:6379/0"})

    assert redactor.redact("the step passed") == "the step passed"
    assert redactor.redact("redis://:pass@redis:6379/0") == f"redis://:{REDACTED}@redis:6379/0"


def test_text_lines_name_the_attempt() -> None:
    stream = configure("text")

    with attempt_context(INFO):
        log.warning("retrying")
    log.warning("idle")

    inside, outside = stream.getvalue().splitlines()
    assert inside.endswith(f"tests.unit.test_logs [run={'a' * 32} step=summarise attempt=2]: retrying")
    assert outside.endswith("tests.unit.test_logs: idle")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_format_is_text_on_a_terminal_and_json_elsewhere() -> None:
    terminal, pipe = Terminal(), io.StringIO()

    configure_logging(log_format="auto", stream=terminal)
    log.warning("to a person")
    configure_logging(log_format="auto", stream=pipe)
    log.warning("to a machine")

    assert terminal.getvalue().rstrip().endswith("tests.unit.test_logs: to a person")
    assert json.loads(pipe.getvalue())["message"] == "to a machine"
    assert "to a machine" not in terminal.getvalue(), "configuring again replaces the earlier handler"


def test_configuring_again_keeps_other_handlers_and_sets_the_level() -> None:
    mine = logging.NullHandler()
    logging.getLogger().addHandler(mine)

    configure(level="debug")
    configure(level="WARNING")

    root = logging.getLogger()
    assert mine in root.handlers
    assert len([h for h in root.handlers if h.get_name() == "orchestrator"]) == 1
    assert root.level == logging.WARNING


def test_unknown_formats_and_levels_are_configuration_errors() -> None:
    with pytest.raises(LogConfigError, match="ORCH_LOG_FORMAT"):
        configure_logging(log_format="yaml")
    with pytest.raises(LogConfigError, match="ORCH_LOG_LEVEL"):
        configure_logging(level="chatty")
