"""Ids drawn without a system call: the format of ``uuid.uuid4().hex``, distinct across threads and across a fork."""

from __future__ import annotations

import os
import re
import threading
import uuid

from orchestrator.infra.ids import new_id


def test_an_id_reads_as_a_version_4_uuid_in_32_hex_digits() -> None:
    for _ in range(1000):
        text = new_id()
        assert re.fullmatch(r"[0-9a-f]{32}", text)
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)


def test_ids_drawn_by_many_threads_at_once_are_all_distinct() -> None:
    drawn: list[list[str]] = [[] for _ in range(8)]
    start = threading.Barrier(len(drawn))

    def draw(into: list[str]) -> None:
        start.wait()
        into.extend(new_id() for _ in range(5000))

    threads = [threading.Thread(target=draw, args=(into,)) for into in drawn]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    ids = [i for into in drawn for i in into]
    assert len(ids) == 40_000
    assert len(set(ids)) == len(ids)


def test_a_forked_child_draws_other_ids_than_its_parent() -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids go to the parent through the pipe
        try:
            os.close(read_end)
            os.write(write_end, "".join(new_id() for _ in range(100)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    parent = {new_id() for _ in range(100)}
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    text = b"".join(chunks).decode()
    child = {text[i : i + 32] for i in range(0, len(text), 32)}
    assert len(child) == 100
    assert parent.isdisjoint(child)
