"""Submitted JSON Schemas never reach outside their document, and their patterns run in linear time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.definition.inputs import validate_inputs
from orchestrator.definition.jsonschemas import MAX_VALIDATION_STEPS
from orchestrator.definition.spec import parse_workflow
from orchestrator.errors import InputValidationError, NonRetryableStepError, WorkflowDefinitionError
from orchestrator.llm import parse_structured
from tests.fuzzing import fuzz
from tests.integration.helpers import wait_for

# Python's re takes seconds on this pair, doubling with each extra "a"; RE2 answers in microseconds.
EVIL_PATTERN = "^(a+)+$"
EVIL_INPUT = "a" * 28 + "!"


class SchemaServer:
    """A local HTTP server that answers every GET with a schema and counts the requests it receives."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.path)
                body = json.dumps({"type": "integer", "a": {"type": "integer"}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture
def schema_server() -> Iterator[SchemaServer]:
    server = SchemaServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def definition(inputs: dict[str, Any], *, output_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    step: dict[str, Any] = {"name": "only", "uses": "noop"}
    if output_schema is not None:
        step = {"name": "only", "uses": "llm", "with": {"prompt": "hi", "output_schema": output_schema}}
    return {"name": "hostile", "inputs": inputs, "steps": [step]}


def remote_schemas(base: str) -> list[dict[str, Any]]:
    return [
        {"$ref": f"{base}/x.json"},
        {"$dynamicRef": f"{base}/x.json#meta"},
        {"$id": f"{base}/", "$ref": "x.json"},  # a relative ref against a retrievable base
        {"properties": {"n": {"$ref": f"{base}/x.json#/a"}}},
        {"const": {"$ref": f"{base}/x.json"}, "allOf": [{"$ref": "#/const"}]},  # data used as a schema by pointer
    ]


def test_an_input_schema_with_a_non_local_ref_is_refused_naming_it_and_nothing_is_fetched(
    schema_server: SchemaServer,
) -> None:
    for schema in remote_schemas(schema_server.url):
        with pytest.raises(WorkflowDefinitionError) as caught:
            parse_workflow(definition({"n": schema}))
        assert schema_server.url in str(caught.value) or "x.json" in str(caught.value), schema
        assert "\n" not in str(caught.value)
    assert schema_server.requests == []


def test_an_output_schema_with_a_non_local_ref_is_refused_naming_it_and_nothing_is_fetched(
    schema_server: SchemaServer,
) -> None:
    for schema in remote_schemas(schema_server.url):
        with pytest.raises(WorkflowDefinitionError, match="output_schema") as caught:
            parse_workflow(definition({}, output_schema=schema))
        assert "x.json" in str(caught.value), schema
    assert schema_server.requests == []


def test_a_worker_refuses_an_output_schema_with_a_remote_ref_without_fetching_it(schema_server: SchemaServer) -> None:
    # A worker may hold a definition stored before the check existed; it must not fetch either.
    with pytest.raises(NonRetryableStepError) as caught:
        parse_structured('{"n": 1}', {"properties": {"n": {"$ref": f"{schema_server.url}/x.json"}}})

    assert caught.value.kind == "invalid_schema"
    assert f"{schema_server.url}/x.json" in str(caught.value)
    assert schema_server.requests == []


def test_a_file_ref_reads_nothing(tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"a": {"type": "integer"}}))
    ref = f"{secret.as_uri()}#/a"

    with pytest.raises(WorkflowDefinitionError, match=r"secret\.json"):
        parse_workflow(definition({"n": {"$ref": ref}}))
    with pytest.raises(NonRetryableStepError, match=r"secret\.json") as caught:
        parse_structured('{"n": "text"}', {"properties": {"n": {"$ref": ref}}})
    assert caught.value.kind == "invalid_schema"  # not a message quoting the file's schema


@pytest.mark.parametrize(
    "schema",
    [{"$ref": "#/$defs/missing"}, {"$defs": {"n": {"type": "integer"}}, "items": {"$ref": "#/$defs/n/nope"}}],
)
def test_an_unresolvable_local_ref_is_a_definition_error_naming_it(schema: dict[str, Any]) -> None:
    with pytest.raises(WorkflowDefinitionError, match="does not resolve") as caught:
        parse_workflow(definition({"n": schema}))
    assert "#/$defs/" in str(caught.value)
    with pytest.raises(WorkflowDefinitionError, match="does not resolve"):
        parse_workflow(definition({}, output_schema=schema))


def test_an_input_schema_may_refer_to_its_own_definitions() -> None:
    spec = parse_workflow(
        definition({"count": {"$defs": {"small": {"type": "integer", "maximum": 9}}, "$ref": "#/$defs/small"}})
    )

    assert validate_inputs(spec, {"count": 3}, max_bytes=10_000) == {"count": 3}
    with pytest.raises(InputValidationError, match=r"'count'.*maximum"):
        validate_inputs(spec, {"count": 30}, max_bytes=10_000)


@pytest.mark.timeout(10)
def test_a_catastrophic_pattern_is_validated_in_linear_time_and_correctly() -> None:
    spec = parse_workflow(definition({"word": {"type": "string", "pattern": EVIL_PATTERN}}))

    with pytest.raises(InputValidationError, match="does not match") as caught:
        validate_inputs(spec, {"word": EVIL_INPUT}, max_bytes=10_000)
    assert "'word'" in str(caught.value)
    assert validate_inputs(spec, {"word": "a" * 28}, max_bytes=10_000) == {"word": "a" * 28}


@pytest.mark.timeout(10)
def test_a_catastrophic_pattern_property_is_matched_in_linear_time_against_submitted_keys() -> None:
    schema = {"type": "object", "patternProperties": {EVIL_PATTERN: {"type": "integer"}}, "additionalProperties": False}
    spec = parse_workflow(definition({"labels": schema}))

    with pytest.raises(InputValidationError, match=r"do(es)? not match any of the regexes"):
        validate_inputs(spec, {"labels": {EVIL_INPUT: 1}}, max_bytes=10_000)
    with pytest.raises(InputValidationError, match="not of type 'integer'"):
        validate_inputs(spec, {"labels": {"aaa": "one"}}, max_bytes=10_000)


@pytest.mark.timeout(10)
def test_an_output_schema_with_a_catastrophic_pattern_is_validated_in_linear_time() -> None:
    schema = {"type": "object", "properties": {"word": {"type": "string", "pattern": EVIL_PATTERN}}}

    with pytest.raises(NonRetryableStepError, match="does not match") as caught:
        parse_structured(json.dumps({"word": EVIL_INPUT}), schema)
    assert caught.value.kind == "invalid_output"


@pytest.mark.parametrize("pattern", [r"^(a)\1$", r"^(?=a)a$", r"(?<!x)y", r"(?!b)c"])
def test_a_pattern_re2_cannot_run_is_refused_in_one_line_naming_it(pattern: str) -> None:
    for data in (
        definition({"word": {"type": "string", "pattern": pattern}}),
        definition({"map": {"type": "object", "patternProperties": {pattern: {}}}}),
        definition({}, output_schema={"type": "string", "pattern": pattern}),
    ):
        with pytest.raises(WorkflowDefinitionError) as caught:
            parse_workflow(data)
        assert repr(pattern) in str(caught.value)
        assert "\n" not in str(caught.value)


def test_unevaluated_properties_beside_pattern_properties_is_refused() -> None:
    # jsonschema evaluates this pair with Python's re internally, out of reach of the RE2 keywords.
    schema = {"type": "object", "patternProperties": {EVIL_PATTERN: {}}, "unevaluatedProperties": False}

    with pytest.raises(WorkflowDefinitionError, match="unevaluatedProperties"):
        parse_workflow(definition({"labels": schema}))


# The API, served by a real uvicorn process of its own (so a GIL held by a regex there cannot stall this test).


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def api_url(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if key != "ORCH_API_TOKENS"}  # no tokens: loopback only
    env["REDIS_URL"] = redis_url
    command = [sys.executable, "-c", "from orchestrator.cli import main; main()", "api", "--port", str(port)]
    log = tmp_path_factory.mktemp("api") / "api.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, f"the API exited: {log.read_text()}"
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(healthy, timeout=30, what="the API to answer /healthz")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # stuck in a regex on old code: it cannot run its SIGTERM handler
            process.kill()
            process.wait()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_the_api_answers_a_non_local_ref_with_422_naming_it_and_fetches_nothing(
    api_url: str, schema_server: SchemaServer
) -> None:
    ref = f"{schema_server.url}/x.json"
    body = {"definition": definition({"n": {"$ref": ref}}), "inputs": {"n": 1}}

    response = httpx.post(f"{api_url}/runs", json=body, timeout=30)

    assert response.status_code == 422, response.text
    assert ref in response.text
    assert schema_server.requests == []


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_healthz_answers_while_a_catastrophic_pattern_is_validated(api_url: str) -> None:
    body = {
        "definition": definition({"word": {"type": "string", "pattern": EVIL_PATTERN}}),
        "inputs": {"word": EVIL_INPUT},
    }

    with ThreadPoolExecutor(1) as pool:
        submitted = pool.submit(httpx.post, f"{api_url}/runs", json=body, timeout=50)
        while True:  # at least once after the submit went out, and for as long as it is pending
            assert httpx.get(f"{api_url}/healthz", timeout=10).status_code == 200
            if submitted.done():
                break
        response = submitted.result()

    assert response.status_code == 422, response.text
    assert "does not match" in response.text


@pytest.mark.timeout(20)
def test_unique_items_over_many_objects_is_checked_in_linear_time() -> None:
    schema = {"type": "array", "uniqueItems": True}
    rows = [{"id": index} for index in range(20_000)]  # jsonschema compares objects pairwise: hours

    assert parse_structured(json.dumps(rows), schema) == rows
    with pytest.raises(NonRetryableStepError, match="non-unique"):
        parse_structured(json.dumps([*rows, {"id": 7}]), schema)
    with pytest.raises(NonRetryableStepError, match="non-unique"):
        parse_structured(json.dumps([[1, {"a": 1.0}], [1.0, {"a": 1}]]), schema)
    distinct = [1, True, "1", [1], {"a": 1}, {"a": True}, None, False, 0]
    assert parse_structured(json.dumps(distinct), schema) == distinct
    spec = parse_workflow(definition({"rows": schema}))
    assert validate_inputs(spec, {"rows": rows}, max_bytes=1_000_000) == {"rows": rows}


def ref_bomb(levels: int) -> dict[str, Any]:
    """A schema of a few lines whose each level applies the one below twice: 2^levels evaluations of one value."""
    defs: dict[str, Any] = {"a0": {"type": "string"}}
    for level in range(1, levels + 1):
        defs[f"a{level}"] = {"allOf": [{"$ref": f"#/$defs/a{level - 1}"}] * 2}
    return {"$defs": defs, "$ref": f"#/$defs/a{levels}"}


@pytest.mark.timeout(60)
def test_a_schema_that_multiplies_its_work_through_refs_is_stopped_at_the_step_budget() -> None:
    with pytest.raises(NonRetryableStepError, match=f"more than {MAX_VALIDATION_STEPS} steps") as caught:
        parse_structured('"x"', ref_bomb(24))
    assert caught.value.kind == "invalid_schema"
    spec = parse_workflow(definition({"word": ref_bomb(24)}))
    with pytest.raises(InputValidationError, match=f"more than {MAX_VALIDATION_STEPS} steps"):
        validate_inputs(spec, {"word": "x"}, max_bytes=1_000)


def test_a_schema_that_applies_itself_without_end_is_a_clear_error() -> None:
    schema = {"$defs": {"n": {"allOf": [{"$ref": "#/$defs/n"}]}}, "$ref": "#/$defs/n"}

    with pytest.raises(NonRetryableStepError, match="without end"):
        parse_structured("1", schema)
    with pytest.raises(InputValidationError, match="without end"):
        validate_inputs(parse_workflow(definition({"n": schema})), {"n": 1}, max_bytes=1_000)


# A fuzzer for the two ways a schema attacks: references that leave the document, patterns that backtrack.

_ATOMS = st.sampled_from(["a", "b", ".", "[ab]", "\\d", "a+", "(a|aa)", "\\1", "(?=a)", "(?<!b)"])
PATTERNS = st.recursive(
    _ATOMS,
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["+", "*", "?", "{2,5}", "+?"])).map(lambda parts: f"({parts[0]}){parts[1]}"),
        st.tuples(inner, inner).map("".join),
        st.tuples(inner, inner).map("|".join),
    ),
    max_leaves=6,
).map(lambda pattern: f"^{pattern}$")
REFS = st.sampled_from(
    [
        "#",
        "#/$defs/a",
        "#/$defs/missing",
        "#/properties",
        "#anchor",
        "x.json",
        "{server}/x.json",
        "file:///etc/hostname",
    ]
)
SCHEMAS = st.recursive(
    st.one_of(
        st.just({"type": "string"}),
        PATTERNS.map(lambda pattern: {"type": "string", "pattern": pattern}),
        REFS.map(lambda ref: {"$ref": ref}),
        REFS.map(lambda ref: {"$dynamicRef": ref}),
    ),
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda schemas: {"allOf": schemas}),
        st.lists(inner, min_size=1, max_size=3).map(lambda schemas: {"anyOf": schemas}),
        st.tuples(PATTERNS, inner).map(
            lambda parts: {"patternProperties": {parts[0]: parts[1]}, "additionalProperties": False}
        ),
        inner.map(lambda schema: {"$defs": {"a": schema}, "$ref": "#/$defs/a"}),
        inner.map(lambda schema: {"$anchor": "anchor", "properties": {"p": schema}}),
        st.tuples(st.sampled_from(["{server}/", "urn:example:x", "file:///tmp/"]), inner).map(
            lambda parts: {"$id": parts[0], "items": parts[1]}
        ),
    ),
    max_leaves=8,
)
VALUES = st.one_of(
    st.text("ab1!", max_size=40),
    st.just(EVIL_INPUT),
    st.dictionaries(
        st.one_of(st.text("ab1!", max_size=30), st.just(EVIL_INPUT)), st.text("ab", max_size=3), max_size=3
    ),
    st.lists(st.text("ab", max_size=30), max_size=3),
)


@pytest.fixture(scope="module")
def module_schema_server() -> Iterator[SchemaServer]:
    server = SchemaServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.mark.timeout(300)
@fuzz(300)
@given(template=SCHEMAS, value=VALUES)
def test_fuzzed_schemas_are_refused_in_one_line_or_validate_without_fetching_or_backtracking(
    module_schema_server: SchemaServer, template: dict[str, Any], value: Any
) -> None:
    schema = json.loads(json.dumps(template).replace("{server}", module_schema_server.url))
    message = ""
    try:
        validate_inputs(parse_workflow(definition({"v": schema})), {"v": value}, max_bytes=100_000)
    except (WorkflowDefinitionError, InputValidationError) as exc:
        message = str(exc)

    assert "\n" not in message
    assert module_schema_server.requests == []
