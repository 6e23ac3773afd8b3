"""The Python client producers use: submit a run, read its status, wait for its end.

With ``REDIS_URL=memory://`` the client is the whole system: runs live in its memory and its own threads run their
steps (:mod:`orchestrator.engine.inprocess`); close it (or use it as a context manager) to stop them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import redis

from orchestrator.definition.inputs import validate_inputs
from orchestrator.definition.mapping import is_map
from orchestrator.definition.registry import import_modules, workflows
from orchestrator.definition.spec import WorkflowSpec, parse_workflow
from orchestrator.definition.subflow import check_subflows
from orchestrator.definition.validation import check_workflow
from orchestrator.definition.workflow import Workflow
from orchestrator.domain import RunStatus, StopOutcome
from orchestrator.engine.control import decide_step, resume_run, stop_run, trace_run_end
from orchestrator.engine.events import Event, EventType, ProgressListener, deliver
from orchestrator.engine.publisher import StepPublisher
from orchestrator.engine.status import MAX_LIST_OFFSET, RunPage, RunSummary, RunView, run_summary, run_view
from orchestrator.engine.subflow import workflow_lookup
from orchestrator.errors import RunNotFoundError, StoreUnavailableError, WorkflowDefinitionError
from orchestrator.infra.ids import new_id
from orchestrator.infra.redis_url import RedisUrlError, is_memory_url
from orchestrator.infra.settings import Settings
from orchestrator.state import MemoryStateStore, RedisStateStore, StateStore, keys
from orchestrator.state.items import ItemPage
from orchestrator.telemetry.tracing import submit_span

if TYPE_CHECKING:
    from celery import Celery

    from orchestrator.engine.inprocess import InProcessEngine

WorkflowRef = str | Workflow | WorkflowSpec | Mapping[str, Any]

_CHECKED_CAP = 10_000
"""Validated definition hashes a client remembers (a producer of many distinct files starts over past this)."""


class Client:
    """Submit runs and follow them.

    With ``settings.redis_url`` ``memory://`` it runs the workflows itself (no Redis, no broker, no worker): a
    :class:`~orchestrator.state.MemoryStateStore` holds the runs and its threads run the steps and the sweeper until
    :meth:`close`. Use it as a context manager to close it.

    Args:
        settings: Where Redis is, limits (default: ``Settings.from_env()``).
        app: The Celery app to publish with (default: the one built from ``settings``; none with ``memory://``).
        store: The state store (default: Redis at ``settings.redis_url``; with ``memory://``, a new in-memory one,
            or the :class:`~orchestrator.state.MemoryStateStore` given).

    Raises:
        RedisUrlError: ``memory://`` with an ``app`` or a store that is not a ``MemoryStateStore``.
    """

    def __init__(
        self, settings: Settings | None = None, *, app: Celery | None = None, store: StateStore | None = None
    ) -> None:
        self.settings = settings or Settings.from_env()
        import_modules(self.settings.imports)
        self._app: Celery | None = None
        self._engine: InProcessEngine | None = None
        self.publisher: StepPublisher
        if is_memory_url(self.settings.redis_url):
            if app is not None or not isinstance(store, MemoryStateStore | None):
                raise RedisUrlError(
                    "REDIS_URL=memory:// runs steps in this process: pass no Celery app, and no "
                    "store but a MemoryStateStore"
                )
            from orchestrator.engine.inprocess import InProcessEngine

            self._engine = InProcessEngine(self.settings, store=store)
            self.publisher = self._engine.publisher
            self.store: StateStore = self._engine.store
        else:
            from orchestrator.celery_app import CeleryPublisher, create_app

            self._app = app if app is not None else create_app(self.settings)
            self.publisher = CeleryPublisher(self._app, self.settings)
            settings = self.settings
            self.store = store or RedisStateStore.from_url(
                settings.redis_url,
                retention_s=settings.retention_s,
                shards=settings.shards,
                wait_replicas=settings.wait_replicas,
            )
        # Definition hashes that passed check_workflow here: it parses every template twice, which was more than
        # half of a submit's CPU, and a definition that passed once passes again (registries only grow).
        self._checked: set[str] = set()

    @property
    def app(self) -> Celery:
        """The Celery app this client publishes with.

        Raises:
            RedisUrlError: With ``REDIS_URL=memory://``, which has none (steps run in this process).
        """
        if self._app is None:
            raise RedisUrlError("REDIS_URL=memory:// has no Celery app: this client runs its steps itself")
        return self._app

    def close(self, timeout: float | None = None) -> None:
        """Release what the client holds: with ``memory://``, stop its sweeper and step threads.

        Steps in progress end first (each waited for up to ``timeout`` seconds); queued ones never start. Runs stay
        readable through :meth:`status`. With Redis there is nothing to stop.
        """
        if self._engine is not None:
            self._engine.close(timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def resolve(self, workflow: WorkflowRef, version: int | None = None) -> WorkflowSpec:
        """The spec behind a registered name, a :class:`Workflow`, a spec, or workflow-file data.

        Raises:
            WorkflowDefinitionError: When it is unknown or invalid.
        """
        if isinstance(workflow, str):
            return workflows.get(workflow, version)
        if isinstance(workflow, Workflow):
            return workflow.spec
        if isinstance(workflow, WorkflowSpec):
            return workflow
        return parse_workflow(dict(workflow))

    def submit(
        self,
        workflow: WorkflowRef,
        inputs: Mapping[str, Any] | None = None,
        *,
        version: int | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Validate, create and start a run; returns its id at once.

        Nothing is written when validation fails. A repeated ``idempotency_key`` returns the first run's id.

        Raises:
            WorkflowDefinitionError: The workflow is invalid or unknown.
            InputValidationError: The inputs do not fit the workflow's schema or are too large.
            StoreUnavailableError: Redis or the broker did not answer.
        """
        spec = self.resolve(workflow, version)
        if spec.definition_hash not in self._checked:
            check_workflow(spec)
            check_subflows(
                spec, workflow_lookup(self.store), max_depth=self.settings.max_subflow_depth, check=check_workflow
            )
            if len(self._checked) >= _CHECKED_CAP:
                self._checked.clear()
            self._checked.add(spec.definition_hash)
        filled = validate_inputs(spec, inputs or {}, max_bytes=self.settings.max_input_bytes)
        run_id = uuid.uuid4().hex
        try:
            if idempotency_key:
                bound = self.store.reserve_idempotency_key(idempotency_key, run_id)
                if bound != run_id and self.store.run_summaries([bound]):
                    return bound
                # A key bound to no run yet: an earlier submit with it stopped (Redis went away) or is under way.
                # This one creates that run; the create script lets one of them make it, and only that one publishes.
                run_id = bound
            self.store.save_definition(spec)
            held = {step: new_id() for step in spec.start_steps}
            self.store.hold_dispatch(run_id, held, self.settings.queued_grace_s)
            if not self.store.create_run(run_id, spec, filled, idempotency_key):
                return run_id
        except redis.RedisError as exc:
            raise StoreUnavailableError(f"cannot reach Redis to create the run: {exc}") from exc
        try:
            with submit_span(run_id, spec.name):
                self.publisher.publish(spec, run_id=run_id, steps=spec.start_steps, generation="1", task_ids=held)
            self.store.announce(run_id, "run_started", spec.name)
        except Exception as exc:
            # The run exists but no task may: fail it rather than leave it "running" forever.
            try:
                self.store.mark_dispatch_failed(run_id, f"could not publish the first steps: {exc}")
                trace_run_end(self.store, run_id)
                if idempotency_key:
                    self.store.release_idempotency_key(idempotency_key, run_id)
            except redis.RedisError as cleanup:
                # Redis went away too: the roots' dispatch hold has the sweeper publish them once it is back.
                raise StoreUnavailableError(
                    f"cannot publish the first steps of run {run_id} ({exc}) nor mark it failed ({cleanup}); "
                    "it starts once Redis is back"
                ) from exc
            raise StoreUnavailableError(f"cannot publish to the broker: {exc}") from exc
        return run_id

    def status(self, run_id: str) -> RunView:
        """The run's status JSON (see README, "Status JSON").

        Raises:
            RunNotFoundError: No such run (or its retention expired).
            StoreUnavailableError: Redis did not answer.
        """
        try:
            fields = self.store.run_fields(run_id)
            spec = self.store.load_definition(fields["def_hash"])
        except redis.RedisError as exc:
            raise StoreUnavailableError(f"cannot reach Redis: {exc}") from exc
        except KeyError:
            raise RunNotFoundError(run_id) from None
        return run_view(fields, spec)

    def items(self, run_id: str, step: str, *, offset: int = 0, limit: int = 100) -> ItemPage:
        """One page of a map step's item records, in index order (``limit`` at most 1,000).

        Raises:
            RunNotFoundError: No such run (or its retention expired).
            WorkflowDefinitionError: The run has no map step ``step``.
            StoreUnavailableError: Redis did not answer.
        """
        try:
            fields = self.store.run_fields(run_id)
            spec = self.store.load_definition(fields["def_hash"])
            step_spec = spec.steps_by_name.get(step)
            if step_spec is None or not is_map(step_spec):
                raise WorkflowDefinitionError(f"run {run_id} has no map step {step[:100]!r}", step=step[:100])
            records = self.store.item_records(run_id, step, offset, limit)
        except redis.RedisError as exc:
            raise StoreUnavailableError(f"cannot reach Redis: {exc}") from exc
        except KeyError:
            raise RunNotFoundError(run_id) from None
        total = int(fields.get(keys.step_field(step, "items_total")) or 0)
        return {"run_id": run_id, "step": step, "total": total, "offset": offset, "limit": limit, "items": records}

    def runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        offset: int = 0,
        scan: int = 2000,
    ) -> list[RunSummary]:
        """Runs, newest first (see :class:`~orchestrator.engine.status.RunSummary`); :meth:`runs_page` also says
        where the next page starts.

        Args:
            status: Only runs with this status.
            workflow: Only runs of this workflow.
            limit: At most this many.
            offset: Skip this many (of the runs that pass the filters), newest first.
            scan: With a filter, how many of the newest runs to look through.

        Raises:
            ValueError: ``limit`` below 1 or ``offset`` outside ``0..MAX_LIST_OFFSET``.
            StoreUnavailableError: Redis did not answer.
        """
        return self.runs_page(status=status, workflow=workflow, limit=limit, offset=offset, scan=scan)["runs"]

    def runs_page(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        offset: int = 0,
        scan: int = 2000,
    ) -> RunPage:
        """One page of :meth:`runs`: ``{"runs", "offset", "limit", "next_offset"}`` (``None`` on the last page).

        Without a filter a page reads ``limit + 1`` index entries and their fields; with one, it looks through the
        ``max(scan, offset + limit + 1)`` newest runs, 200 at a time (one round trip each), and stops once it has found
        one more than the page holds. Arguments and errors as :meth:`runs`.
        """
        if limit < 1:
            raise ValueError(f"limit: {limit} is below 1")
        if not 0 <= offset <= MAX_LIST_OFFSET:
            raise ValueError(f"offset: {offset} is outside 0..{MAX_LIST_OFFSET}")
        filtered = status is not None or workflow is not None
        now = time.time()
        found: list[RunSummary] = []
        try:
            if filtered:
                ids = self.store.list_run_ids(limit=max(scan, offset + limit + 1))
                skip = offset
            else:
                ids, skip = self.store.list_run_ids(limit=limit + 1, offset=offset), 0
            for start in range(0, len(ids), 200):
                for row in self.store.run_summaries(ids[start : start + 200]):
                    summary = run_summary(row, now)
                    if (status is None or summary["status"] == status) and (
                        workflow is None or summary["workflow"] == workflow
                    ):
                        if skip:
                            skip -= 1
                            continue
                        found.append(summary)
                if len(found) > limit:
                    break
        except redis.RedisError as exc:
            raise StoreUnavailableError(f"cannot reach Redis: {exc}") from exc
        more = len(found) > limit if filtered else len(ids) > limit
        return {
            "runs": found[:limit],
            "offset": offset,
            "limit": limit,
            "next_offset": offset + limit if more else None,
        }

    def cancel(self, run_id: str) -> dict[str, Any]:
        """Cancel a run: no step starts after this returns; running steps are interrupted; outputs are kept.

        Cancelling twice, or cancelling a finished run, changes nothing and says so.

        Returns:
            ``{"run_id", "status", "cancelled": bool, "message"}``.

        Raises:
            RunNotFoundError: No such run.
        """
        result = stop_run(self.publisher, self.store, run_id, RunStatus.CANCELLED, "cancelled", settings=self.settings)
        if result.outcome == StopOutcome.OK:
            running = list(dict.fromkeys(step for step, _ in result.interrupted))
            message = f"cancelled run {run_id}" + (f"; interrupted {', '.join(running)}" if running else "")
            return {"run_id": run_id, "status": "cancelled", "cancelled": True, "message": message}
        if result.outcome == StopOutcome.MISSING:
            raise RunNotFoundError(run_id)
        status = result.detail
        return {
            "run_id": run_id,
            "status": status,
            "cancelled": False,
            "message": f"run {run_id} had already ended ({status}): nothing to cancel",
        }

    def resume(self, run_id: str, *, from_step: str | None = None, allow_definition_change: bool = False) -> str:
        """Re-run a failed, cancelled or timed-out run from its checkpoint; returns the new generation.

        Only steps that did not succeed run again (``from_step``: that step and its dependents too); a step whose
        definition and inputs match its stored result reuses it.

        Raises:
            RunNotFoundError: No such run.
            RunStateError: The run is still going, succeeded (without ``from_step``), another resume won, or the
                deployed definition of its workflow version changed and ``allow_definition_change`` is off.
            WorkflowDefinitionError: ``from_step`` is not one of its steps.
        """
        return resume_run(
            self.publisher,
            self.settings,
            self.store,
            run_id,
            from_step=from_step,
            allow_definition_change=allow_definition_change,
        )

    def approve(self, run_id: str, step: str, *, by: str, comment: str = "", item: int | None = None) -> dict[str, Any]:
        """Approve a waiting approval step as ``by``; its dependents are released at once.

        On an approval map step, ``item`` names the item decided (one decision per item).

        Raises:
            RunNotFoundError: No such run.
            WorkflowDefinitionError: No such step, or not an approval step.
            DecisionRefusedError: ``by`` is not an approver, or the step is not waiting (decided already …).
            InputValidationError: ``item`` missing on a map step, or given on another.
        """
        return decide_step(
            self.publisher,
            self.settings,
            self.store,
            run_id,
            step,
            decision="approve",
            by=by,
            comment=comment,
            item=item,
        )

    def reject(self, run_id: str, step: str, *, by: str, comment: str = "", item: int | None = None) -> dict[str, Any]:
        """Reject a waiting approval step as ``by``: it fails (its output says ``approved: false``).

        Raises:
            RunNotFoundError: No such run.
            WorkflowDefinitionError: No such step, or not an approval step.
            DecisionRefusedError: ``by`` is not an approver, or the step is not waiting.
        """
        return decide_step(
            self.publisher,
            self.settings,
            self.store,
            run_id,
            step,
            decision="reject",
            by=by,
            comment=comment,
            item=item,
        )

    def stream(self, run_id: str, *, after: int = 0, until_end: bool = True, poll_s: float = 5.0) -> Iterator[Event]:
        """The run's events in order, from ``seq > after``, live as they happen.

        Replays what already happened, then blocks for more; stops after the run's final event when ``until_end``.
        Reconnecting with ``after=`` the last ``seq`` seen misses and repeats nothing.

        Raises:
            RunNotFoundError: No such run.
        """
        # A few fields, not the whole hash: outputs can be large and this repeats on every quiet poll.
        if not self.store.run_summaries([run_id]):
            raise RunNotFoundError(run_id)
        while True:
            batch = self.store.wait_events(run_id, after, poll_s)
            for event in batch:
                after = event.seq
                yield event
                if until_end and EventType(event.type).ends_run and self._really_ended(run_id, event.seq):
                    return
            if batch or not until_end:
                continue
            summary = self.store.run_summaries([run_id])
            if not summary:
                raise RunNotFoundError(run_id)  # expired while we listened
            if RunStatus(summary[0]["status"]).finished:
                # Ended before we started listening and its final event was trimmed or already seen.
                return

    def _really_ended(self, run_id: str, seq: int) -> bool:
        # A replay passes the end of an earlier generation before reaching a resume: only the last end is the end.
        return not self.store.events(run_id, after=seq, count=1)

    def watch(self, run_id: str, listener: ProgressListener, *, after: int = 0) -> RunView:
        """Feed the run's events to ``listener`` until it ends; returns the final status JSON.

        A listener that raises is logged and skipped; the run is never affected.
        """
        for event in self.stream(run_id, after=after):
            deliver(listener, event)
        return self.status(run_id)

    def wait(self, run_id: str, timeout: float | None = None, poll_s: float = 0.1) -> RunView:
        """Block until the run ends (or ``timeout`` seconds pass) and return its status JSON.

        Raises:
            TimeoutError: When ``timeout`` passed first.
            RunNotFoundError: No such run.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            view = self.status(run_id)
            if RunStatus(view["status"]).finished:
                return view
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {run_id} still {view['status']} after {timeout}s")
            time.sleep(poll_s)
