"""Principal names the orchestrator uses itself, so no token and no ``--as`` may take them.

``timeout`` is the name an approval timeout is audited under: the sweeper's decision is allowed by its explicit
``timed_out`` flag (:func:`orchestrator.engine.control.decide_step`), never by this name, and anyone else deciding as
``timeout`` is refused. ``anonymous`` is who a loopback client acts as when the API has no tokens. A token or a CLI
user taking either name would make the audit trail lie about who decided.
"""

from __future__ import annotations

from typing import Final

__all__ = ["ANONYMOUS_PRINCIPAL", "RESERVED_PRINCIPALS", "TIMEOUT_PRINCIPAL", "is_reserved", "reserved_message"]

TIMEOUT_PRINCIPAL: Final = "timeout"
ANONYMOUS_PRINCIPAL: Final = "anonymous"
RESERVED_PRINCIPALS: Final = frozenset({TIMEOUT_PRINCIPAL, ANONYMOUS_PRINCIPAL})


def is_reserved(name: str) -> bool:
    """Whether ``name`` is, or only differs by case and surrounding spaces from, a reserved principal."""
    return name.strip().casefold() in RESERVED_PRINCIPALS


def reserved_message(name: str) -> str:
    """The one-line refusal of a reserved principal ``name``."""
    return (
        f"principal {name!r} is reserved for the orchestrator itself "
        f"({', '.join(sorted(RESERVED_PRINCIPALS))}): choose another name"
    )
