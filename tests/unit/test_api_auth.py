"""API tokens: parsing ``ORCH_API_TOKENS``, scope checks, the loopback rule. No services needed."""

from __future__ import annotations

import json

import pytest

from orchestrator.api.auth import ApiAuth, ApiConfigError, AuthError, Scope, bearer_token, check_bind, is_loopback

pytestmark = pytest.mark.timeout(30)

TOKENS = json.dumps(
    {
        "tok-read-1": {"principal": "dashboard", "scopes": ["read"]},
        "tok-write-2": {"principal": "producer", "scopes": ["read", "write"]},
        "tok-all-3": {"principal": "ops", "scopes": ["read", "write", "approve"]},
    }
)


def test_tokens_parse_into_principals_with_their_scopes() -> None:
    auth = ApiAuth.from_env({"ORCH_API_TOKENS": TOKENS})

    assert auth.enabled
    assert auth.principals == ["dashboard", "ops", "producer"]
    reader = auth.authenticate("tok-read-1")
    assert reader is not None
    assert (reader.name, reader.scopes) == ("dashboard", frozenset({Scope.READ}))
    assert auth.authenticate("tok-read-") is None


@pytest.mark.parametrize("raw", [None, "", "  ", "{}"])
def test_no_tokens_configured_means_authentication_is_off(raw: str | None) -> None:
    env = {} if raw is None else {"ORCH_API_TOKENS": raw}

    assert not ApiAuth.from_env(env).enabled


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "ORCH_API_TOKENS is not valid JSON"),
        ('["tok-secret-9"]', "must be a JSON object"),
        ('{"tok-secret-9": {"principal": "ci"}}', "entry 1 (principal 'ci'): scopes: Field required"),
        ('{"tok-secret-9": {"principal": "ci", "scopes": []}}', "scopes: List should have at least 1 item"),
        ('{"tok-secret-9": {"principal": "ci", "scopes": ["admin"]}}', "scopes.0: Input should be 'read'"),
        ('{"tok-secret-9": {"principal": "", "scopes": ["read"]}}', "principal: String should have at least 1"),
        ('{"tok-secret-9": {"principal": "ci", "scopes": ["read"], "x": 1}}', "x: Extra inputs are not permitted"),
        ('{"tok-secret-9": "read"}', "entry 1: entry: Input should be a valid dictionary"),
        ('{"tok secret 9": {"principal": "ci", "scopes": ["read"]}}', "printable ASCII without spaces"),
        ('{"": {"principal": "ci", "scopes": ["read"]}}', "a token must be non-empty"),
    ],
)
def test_a_malformed_token_list_is_a_startup_error_that_never_shows_a_token(raw: str, message: str) -> None:
    with pytest.raises(ApiConfigError) as error:
        ApiAuth.parse(raw)

    assert message in str(error.value)
    assert "secret" not in str(error.value)


def test_a_request_needs_a_valid_token_holding_the_scope() -> None:
    auth = ApiAuth.parse(TOKENS)

    with pytest.raises(AuthError) as missing:
        auth.authorize(None, Scope.READ, "127.0.0.1")
    with pytest.raises(AuthError) as forged:
        auth.authorize("tok-read-2", Scope.READ, "127.0.0.1")
    with pytest.raises(AuthError) as no_scope:
        auth.authorize("tok-read-1", Scope.WRITE, "127.0.0.1")
    with pytest.raises(AuthError) as cannot_approve:
        auth.authorize("tok-write-2", Scope.APPROVE, "10.1.2.3")

    assert (missing.value.status_code, forged.value.status_code) == (401, 401)
    assert (no_scope.value.status_code, cannot_approve.value.status_code) == (403, 403)
    assert "'dashboard' lacks the 'write' scope" in str(no_scope.value)
    assert auth.authorize("tok-all-3", Scope.APPROVE, "10.1.2.3").name == "ops"
    assert auth.authorize("tok-write-2", Scope.WRITE, "10.1.2.3").name == "producer"


def test_without_tokens_loopback_clients_may_do_everything_and_others_nothing() -> None:
    auth = ApiAuth()

    for host in ("127.0.0.1", "127.8.9.10", "::1", "localhost"):
        assert auth.authorize(None, Scope.APPROVE, host).scopes == frozenset(Scope)
    for host in ("10.0.0.5", "192.168.1.1", "::ffff:10.0.0.5", "example.com", None):
        with pytest.raises(AuthError) as refused:
            auth.authorize(None, Scope.READ, host)
        assert refused.value.status_code == 403


def test_without_tokens_the_api_may_only_listen_on_loopback() -> None:
    check_bind("127.0.0.1", ApiAuth())
    check_bind("::1", ApiAuth())
    check_bind("localhost", ApiAuth())
    check_bind("0.0.0.0", ApiAuth.parse(TOKENS))

    for host in ("0.0.0.0", "::", "10.0.0.5"):
        with pytest.raises(ApiConfigError, match=f"refusing to listen on {host}: ORCH_API_TOKENS is not set"):
            check_bind(host, ApiAuth())


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc  ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer   ", None),
        ("", None),
        (None, None),
    ],
)
def test_the_bearer_token_is_read_from_the_authorization_header(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_loopback_means_the_loopback_interface_only() -> None:
    assert [is_loopback(h) for h in ("127.0.0.1", "[::1]", "LOCALHOST", "0.0.0.0", "", "localhost.evil")] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
