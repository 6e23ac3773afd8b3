"""SHA-256 fed in pieces that keep the GIL: the digest is hashlib's, whatever the length."""

from __future__ import annotations

import hashlib

import pytest

from orchestrator.infra.digests import sha256


@pytest.mark.parametrize("length", [0, 1, 2046, 2047, 2048, 4094, 4095, 10_000])
def test_the_digest_is_hashlibs_on_either_side_of_every_piece_boundary(length: int) -> None:
    data = bytes(i % 251 for i in range(length))

    assert sha256(data).hexdigest() == hashlib.sha256(data).hexdigest()
    assert sha256(data).digest() == hashlib.sha256(data).digest()
