"""SHA-256 digests that keep the GIL.

CPython's ``hashlib`` lets go of the GIL while it hashes 2048 bytes or more in one call (``HASHLIB_GIL_MINSIZE``), so
that other threads can run meanwhile. For the few kilobytes a step hashes (its result key covers its parents' outputs,
the reply cache's request digest and the offline provider's request key its prompt, a map item's key the item) that
is a loss in a threads worker: hashing them takes microseconds, while letting go of the GIL hands it to one of the
other few hundred threads, and getting it back waits for that thread. Fed in pieces below that size, the digest is
the same and the GIL stays.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hashlib import _Hash

_PIECE = 2047
"""The largest piece ``hashlib`` hashes without letting go of the GIL (one byte below ``HASHLIB_GIL_MINSIZE``)."""


def sha256(data: bytes) -> _Hash:
    """``hashlib.sha256(data)``, fed without letting go of the GIL."""
    digest = hashlib.sha256()
    view = memoryview(data)
    for start in range(0, len(view), _PIECE):
        digest.update(view[start : start + _PIECE])
    return digest
