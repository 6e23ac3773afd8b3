"""API tokens and scopes: ``Authorization: Bearer TOKEN``, tokens read from ``ORCH_API_TOKENS`` at start.

``ORCH_API_TOKENS`` is a JSON object mapping each token to ``{"principal": NAME, "scopes": [...]}`` with scopes from
``read`` (GETs and event streams), ``write`` (submit, cancel, resume) and ``approve`` (decisions). With no tokens the
API serves loopback clients only, and :func:`check_bind` refuses any other address to listen on.

Tokens never appear in a message or a log line: a bad entry is named by its position and principal.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import OrchestratorError
from orchestrator.principals import ANONYMOUS_PRINCIPAL, is_reserved, reserved_message

TOKENS_ENV = "ORCH_API_TOKENS"
ANONYMOUS = ANONYMOUS_PRINCIPAL


class ApiConfigError(OrchestratorError):
    """The API's configuration is unusable (a malformed ``ORCH_API_TOKENS``, an address it may not listen on)."""


class Scope(StrEnum):
    """What a token may do."""

    READ = "read"
    WRITE = "write"
    APPROVE = "approve"


class AuthError(Exception):
    """A request without a valid token (401) or without the scope it needs (403).

    Attributes:
        status_code: 401 or 403.
    """

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class Principal:
    """Who is calling, and what they may do."""

    name: str
    scopes: frozenset[Scope]


class _TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    principal: str = Field(min_length=1, max_length=200)
    scopes: list[Scope] = Field(min_length=1)


def _authority_host(authority: str) -> str | None:
    """The host of ``name``, ``name:port``, ``[v6]`` or ``[v6]:port``; ``None`` when malformed."""
    if authority.startswith("["):
        host, bracket, rest = authority[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and _is_port(rest[1:]))):
            return None
        return host
    host, colon, port = authority.partition(":")
    if colon and not _is_port(port):
        return None
    return host


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5


def shown(value: str, limit: int = 100) -> str:
    """``value`` quoted for a one-line error, cut at ``limit`` characters: headers may be kilobytes long."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def is_loopback_host_header(value: str | None) -> bool:
    """Whether a ``Host`` header names this machine's loopback (``localhost``, 127.0.0.0/8, ``[::1]``, any port).

    A DNS rebinding attack reaches a loopback server under the attacker's own name, so that name is what it sends.
    """
    host = _authority_host(value.strip()) if value else None
    return host is not None and is_loopback(host)


def is_loopback_origin(origin: str) -> bool:
    """Whether an ``Origin`` header is an ``http(s)`` origin on this machine's loopback (``null`` is not)."""
    scheme, separator, authority = origin.strip().partition("://")
    if not separator or scheme.lower() not in {"http", "https"}:
        return False
    return is_loopback_host_header(authority)


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address or ``localhost``) is this machine's loopback interface."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ApiAuth:
    """The configured tokens; empty means "no authentication, loopback clients only".

    No principal may take a reserved name (:mod:`orchestrator.principals`): ``timeout`` is who approval timeouts are
    audited as, ``anonymous`` who a loopback client is without tokens.

    Attributes:
        tokens: ``(token, principal)`` pairs.

    Raises:
        ApiConfigError: A principal has a reserved name.
    """

    tokens: tuple[tuple[str, Principal], ...] = ()

    def __post_init__(self) -> None:
        for index, (_, principal) in enumerate(self.tokens, start=1):
            if is_reserved(principal.name):
                raise ApiConfigError(f"token {index}: {reserved_message(principal.name)}")

    @property
    def enabled(self) -> bool:
        """Whether requests need a token."""
        return bool(self.tokens)

    @property
    def principals(self) -> list[str]:
        """The configured principals' names (safe to log)."""
        return sorted({principal.name for _, principal in self.tokens})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ApiAuth:
        """Read ``ORCH_API_TOKENS`` from ``environ`` (default ``os.environ``); unset or empty means no tokens.

        Raises:
            ApiConfigError: When the value is malformed (the message never contains a token).
        """
        env = os.environ if environ is None else environ
        return cls.parse(env.get(TOKENS_ENV, ""))

    @classmethod
    def parse(cls, raw: str) -> ApiAuth:
        """Parse the ``ORCH_API_TOKENS`` JSON.

        Raises:
            ApiConfigError: When it is not a JSON object of ``token -> {"principal", "scopes"}``, or a principal has
                a reserved name.
        """
        if not raw.strip():
            return cls()
        try:
            data: Any = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ApiConfigError(f"{TOKENS_ENV} is not valid JSON ({exc.msg} at position {exc.pos})") from None
        if not isinstance(data, dict):
            raise ApiConfigError(f"{TOKENS_ENV} must be a JSON object mapping tokens to principals")
        tokens: list[tuple[str, Principal]] = []
        for index, (token, entry) in enumerate(data.items(), start=1):
            where = f"{TOKENS_ENV} entry {index}"
            if isinstance(entry, dict) and isinstance(entry.get("principal"), str):
                where += f" (principal {entry['principal']!r})"
            if not token or not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
                raise ApiConfigError(f"{where}: a token must be non-empty printable ASCII without spaces")
            try:
                parsed = _TokenEntry.model_validate(entry)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in error['loc']) or 'entry'}: {error['msg']}" for error in exc.errors()
                )
                raise ApiConfigError(f"{where}: {problems}") from None
            if is_reserved(parsed.principal):
                raise ApiConfigError(f"{where}: {reserved_message(parsed.principal)}")
            tokens.append((token, Principal(parsed.principal, frozenset(parsed.scopes))))
        return cls(tuple(tokens))

    def authenticate(self, token: str) -> Principal | None:
        """The principal holding ``token``, or ``None``; compares in constant time."""
        found: Principal | None = None
        for known, principal in self.tokens:
            if hmac.compare_digest(known.encode(), token.encode()):
                found = principal
        return found

    def check_browser(self, host: str | None, origin: str | None) -> None:
        """Refuse what a web page could send from a browser on this machine while there are no tokens.

        Without tokens, being on loopback is the only credential, and a browser on loopback carries it for any page
        it shows: a page's form or fetch sends a foreign ``Origin``, and a DNS rebinding attack sends its own name as
        ``Host``. So only loopback ``Host`` names are served, and an ``Origin``, when present, must be loopback
        too. A bearer token is never sent by a browser on its own, so with tokens nothing here applies.

        Raises:
            AuthError: 403 naming the refused header.
        """
        if self.enabled:
            return
        if not is_loopback_host_header(host):
            raise AuthError(
                403,
                f"Host {shown(host or '')} is not a loopback name: without {TOKENS_ENV} the API "
                "answers only to localhost, 127.0.0.1 or [::1]",
            )
        if origin is not None and not is_loopback_origin(origin):
            raise AuthError(
                403,
                f"Origin {shown(origin)} is not a loopback origin: without {TOKENS_ENV} the API "
                "refuses requests from other sites",
            )

    def authorize(self, token: str | None, scope: Scope, client_host: str | None) -> Principal:
        """Who may do something that needs ``scope``.

        Without configured tokens every loopback client may do everything, and nobody else anything.

        Raises:
            AuthError: 401 without a valid token, 403 without the scope (or, with no tokens, from afar).
        """
        if not self.enabled:
            if is_loopback(client_host):
                return Principal(ANONYMOUS, frozenset(Scope))
            raise AuthError(403, f"{TOKENS_ENV} is not set: the API only serves loopback clients")
        if not token:
            raise AuthError(401, "missing bearer token (send 'Authorization: Bearer TOKEN')")
        principal = self.authenticate(token)
        if principal is None:
            raise AuthError(401, "invalid bearer token")
        if scope not in principal.scopes:
            raise AuthError(403, f"principal {principal.name!r} lacks the {scope.value!r} scope")
        return principal


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header value, or ``None``."""
    if not authorization:
        return None
    kind, _, token = authorization.strip().partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def check_bind(host: str, auth: ApiAuth) -> None:
    """Refuse to listen anywhere but loopback while no tokens are configured.

    Raises:
        ApiConfigError: When ``host`` is not a loopback address and there are no tokens.
    """
    if not auth.enabled and not is_loopback(host):
        raise ApiConfigError(
            f"refusing to listen on {host}: {TOKENS_ENV} is not set, so the API has no authentication; "
            "listen on 127.0.0.1 or configure tokens"
        )
