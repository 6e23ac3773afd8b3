"""Nobody decides an approval as ``timeout``: the sweeper's timeout decisions are allowed by an explicit flag, never by
the name they are audited under, and no API token or ``--as`` may take a name the orchestrator reserves."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator import Client
from orchestrator.api.auth import ApiAuth, ApiConfigError, Principal, Scope
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.errors import DecisionRefusedError
from tests.integration.helpers import py, wait_for, workflow
from tests.integration.test_cli import assert_clean_failure, orchestrator

pytestmark = pytest.mark.timeout(120)


def review(*approvers: str, **params: Any) -> dict[str, Any]:
    return {"name": "review", "uses": "approval", "with": {"approvers": list(approvers), **params}}


def waiting_review(client: Client, name: str, *approvers: str) -> str:
    run_id = client.submit(workflow(name, review(*approvers), py("publish", "tests.count_calls", "review")))
    wait_for(lambda: client.status(run_id)["steps"]["review"]["status"] == "waiting", what="the review to wait")
    return run_id


def audit(client: Client, run_id: str) -> list[tuple[str, str, str]]:
    trail = client.status(run_id)["steps"]["review"]["approval"]["audit"]
    return [(entry["by"], entry["decision"], entry["outcome"]) for entry in trail]


@pytest.mark.parametrize("name", ["timeout", "anonymous", "Timeout", " timeout "])
def test_a_token_whose_principal_is_a_reserved_name_is_refused_when_the_tokens_are_read(name: str) -> None:
    raw = json.dumps({"tok-secret-1": {"principal": name, "scopes": ["read", "approve"]}})

    with pytest.raises(ApiConfigError) as error:
        ApiAuth.parse(raw)

    message = str(error.value)
    assert "\n" not in message
    assert f"entry 1 (principal {name!r})" in message
    assert "is reserved" in message
    assert "secret" not in message


def test_tokens_built_in_code_cannot_take_a_reserved_name_either() -> None:
    with pytest.raises(ApiConfigError, match="'timeout' is reserved"):
        ApiAuth((("tok-1", Principal("timeout", frozenset({Scope.APPROVE}))),))


def test_ordinary_principal_names_are_still_accepted() -> None:
    raw = json.dumps(
        {
            "tok-1": {"principal": "timeout-ops", "scopes": ["approve"]},
            "tok-2": {"principal": "editor", "scopes": ["read"]},
        }
    )

    assert ApiAuth.parse(raw).principals == ["editor", "timeout-ops"]


@pytest.mark.integration
def test_deciding_as_timeout_without_the_sweeper_s_flag_is_refused_and_audited(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    run_id = waiting_review(client, f"spoof_timeout_{unique}", "editor")

    with pytest.raises(DecisionRefusedError) as error:
        client.approve(run_id, "review", by="timeout", comment="spoofed")

    assert error.value.reason == "not_an_approver"
    assert "reserved" in str(error.value)
    assert client.status(run_id)["steps"]["review"]["status"] == "waiting"
    assert audit(client, run_id) == [("timeout", "approve", "refused: not an approver")]


@pytest.mark.integration
def test_a_step_listing_timeout_as_an_approver_still_gives_that_name_nothing(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    run_id = waiting_review(client, f"timeout_listed_{unique}", "timeout", "editor")

    with pytest.raises(DecisionRefusedError):
        client.reject(run_id, "review", by="timeout")
    client.approve(run_id, "review", by="editor")

    assert client.wait(run_id, timeout=30)["status"] == "succeeded"
    assert [entry[0] for entry in audit(client, run_id)] == ["timeout", "editor"]


@pytest.mark.integration
def test_an_approval_timeout_still_decides_and_is_audited_as_timeout(
    client: Client, workers: LocalWorkers, unique: str
) -> None:
    spec = workflow(
        f"real_timeout_{unique}",
        review("editor", timeout_s=0.5, on_timeout="reject"),
        py("publish", "tests.count_calls", "review"),
    )

    view = client.wait(client.submit(spec), timeout=30)

    assert view["steps"]["review"]["status"] == "failed"
    assert view["steps"]["review"]["output"] == {
        "approved": False,
        "decision": "timeout:reject",
        "by": "timeout",
        "comment": "",
    }


@pytest.mark.integration
@pytest.mark.parametrize("name", ["timeout", "anonymous"])
def test_the_command_line_refuses_to_decide_as_a_reserved_name_and_writes_nothing(
    client: Client, workers: LocalWorkers, redis_url: str, unique: str, name: str
) -> None:
    run_id = waiting_review(client, f"cli_reserved_{unique}", "editor", name)

    proc = orchestrator("approve", run_id, "review", "--as", name, redis_url=redis_url)

    assert_clean_failure(proc, f"--as: principal {name!r} is reserved")
    assert proc.returncode == 2
    assert client.status(run_id)["steps"]["review"]["status"] == "waiting"
    assert audit(client, run_id) == []
