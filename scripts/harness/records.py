"""The raw Celery baseline's clock: start and end times its tasks append to per-process files.

Raw tasks (``scripts.steps.bench``) write ``tag index start end`` lines to ``$BENCH_RECORD_DIR/PID.log`` rather than
to Redis, so the baseline's Redis command counts carry no measurement traffic. ``RecordReader`` follows those files.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass

RECORD_DIR_ENV = "BENCH_RECORD_DIR"


@dataclass(frozen=True)
class Record:
    """One raw task's index in its batch, and its ``time.time()`` at start and end."""

    index: int
    start: float
    end: float


class RecordReader:
    """Follows the per-process files the raw tasks append ``tag index start end`` lines to.

    Args:
        directory: The ``BENCH_RECORD_DIR`` the workers were started with.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._offsets: dict[str, int] = {}
        self._partial: dict[str, bytes] = {}
        self.by_tag: dict[str, list[Record]] = defaultdict(list)

    def poll(self) -> None:
        """Read what the files gained since the last poll."""
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            offset = self._offsets.get(path, 0)
            if os.path.getsize(path) <= offset:
                continue
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read()
            self._offsets[path] = offset + len(data)
            lines = (self._partial.pop(path, b"") + data).split(b"\n")
            self._partial[path] = lines.pop()
            for line in lines:
                tag, index, start, end = line.decode().split()
                self.by_tag[tag].append(Record(int(index), float(start), float(end)))

    def wait(self, tag: str, count: int, timeout: float, poll_s: float) -> list[Record]:
        """The ``count`` records of ``tag`` by index, once all are written (and forgets them).

        Raises:
            TimeoutError: Fewer than ``count`` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            got = self.by_tag.get(tag, [])
            if len(got) >= count:
                return sorted(self.by_tag.pop(tag), key=lambda r: r.index)
            if time.monotonic() > deadline:
                raise TimeoutError(f"raw tasks {tag!r}: {len(got)} of {count} recorded after {timeout}s")
            time.sleep(poll_s)
