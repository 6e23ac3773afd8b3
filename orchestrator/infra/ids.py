"""Task ids and other unique names, drawn without a system call.

``uuid.uuid4()`` reads 16 bytes from ``os.urandom`` every time: a system call, and in a threads worker every system
call lets go of the GIL, which one of the other few hundred threads then takes. A step makes a few such ids (the task
ids its released children are held and published under, kombu's delivery tag for each message), and that hand-off
was about 3% of the llm worker's GIL time under load. :func:`new_id` draws the same 122 random bits of a version-4
UUID from a Mersenne Twister instead, seeded from ``os.urandom`` once per process and again in every forked child
(a prefork child must not repeat its parent's ids). ``getrandbits`` runs under the GIL in one C call, so threads can
share the generator.

These ids are unique, not secret: a task id fences a stale worker off a step's state (the scripts compare it), it
grants nothing, and the API never takes one. Anything that must not be guessed (API tokens, signing keys) comes from
``secrets``, never from here.
"""

from __future__ import annotations

import os
import random

_VERSION_MASK = ~(0xF000 << 64 | 0xC000 << 48)
_VERSION_4 = 0x4000 << 64 | 0x8000 << 48  # version 4 in the time_hi field, RFC 4122 variant in clock_seq


_generator = random.Random(os.urandom(32))


def _reseed() -> None:
    _generator.seed(os.urandom(32))


os.register_at_fork(after_in_child=_reseed)


def new_id() -> str:
    """A random version-4 UUID as 32 lower-case hex digits, as ``uuid.uuid4().hex`` writes it."""
    return f"{_generator.getrandbits(128) & _VERSION_MASK | _VERSION_4:032x}"
