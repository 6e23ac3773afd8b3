"""``orchestrator worker``: which pools it can start."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from orchestrator.cli import _pool_option, main


@pytest.mark.parametrize(
    ("args", "pool"),
    [
        (("-Q", "llm", "-P", "threads", "-c", "100"), "threads"),
        (("-Pgevent",), "gevent"),
        (("--pool", "eventlet"), "eventlet"),
        (("--pool=prefork", "-c", "2"), "prefork"),
        (("-c", "8"), None),
    ],
)
def test_the_pool_is_read_from_every_spelling_of_celerys_option(args: tuple[str, ...], pool: str | None) -> None:
    assert _pool_option(args) == pool


@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_the_worker_command_refuses_a_green_pool_it_could_not_monkeypatch_in_time(pool: str) -> None:
    result = CliRunner().invoke(main, ["worker", "-Q", "llm", "-P", pool, "-c", "100"])

    assert result.exit_code != 0
    assert f"--pool {pool} needs monkeypatching" in result.output
    assert "--pool threads" in result.output
