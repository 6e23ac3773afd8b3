"""A step's ``repeat:`` block, the shape of a bounded loop (run by :mod:`orchestrator.engine.repeat`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_ITERATIONS = 100
"""The most iterations a ``repeat`` may run (``repeat.max_iterations``): each is a checkpoint in the run's hash."""


class RepeatSpec(BaseModel):
    """A step's ``repeat:``: run it again while ``until`` is false, at most ``max_iterations`` times.

    Attributes:
        until: A safe expression over ``output`` (this iteration's), ``previous``, ``iteration``, ``inputs`` and
            ``steps``, evaluated after each iteration.
        until_function: The name of a registered callable on the step context instead (Python workflows).
        max_iterations: The most iterations, 1 to :data:`MAX_ITERATIONS`.
        on_exhausted: ``succeed`` (with ``until_met: false``) or ``fail`` (``max_iterations``, never retried) when
            the last iteration ends with ``until`` still false.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    until: str | None = Field(default=None, min_length=1, max_length=2000)
    until_function: str | None = Field(default=None, min_length=1, max_length=200)
    max_iterations: int = Field(ge=1, le=MAX_ITERATIONS)
    on_exhausted: Literal["succeed", "fail"] = "succeed"

    @model_validator(mode="after")
    def _one_until(self) -> RepeatSpec:
        if (self.until is None) == (self.until_function is None):
            raise ValueError("give until (an expression) or until_function, exactly one")
        return self
