"""The sweep: recovers steps whose worker was lost, fires workflow deadlines and approval timeouts.

It runs in every worker's main process (a Celery bootstep, :mod:`workers.sweeper`) and in ``orchestrator sweeper``
(:mod:`orchestrator.engine.sweep_service`); a short Redis lock lets one process sweep per interval. Deadlines are
durable (a sorted set in Redis): one that passed while no worker ran fires when the first sweep runs.
"""

from __future__ import annotations

import logging
import uuid

import redis

from orchestrator.definition.spec import ApprovalParams
from orchestrator.domain import RunStatus, StopOutcome
from orchestrator.engine.backlog import queue_depths
from orchestrator.engine.control import DEADLINE_REASON, decide_step, stop_run
from orchestrator.engine.runtime import Runtime
from orchestrator.errors import (
    DecisionRefusedError,
    DefinitionNotFoundError,
    ErrorRecord,
    InputValidationError,
    RunNotFoundError,
)
from orchestrator.principals import TIMEOUT_PRINCIPAL
from orchestrator.state import keys

log = logging.getLogger(__name__)

MAX_BACKLOG_GRACES = 8
"""While the step queues hold a backlog, a step nobody claimed is sent again only after this many graces."""


def sweep_once(runtime: Runtime, owner: str) -> int:
    """One sweep: re-dispatch lost steps, time out runs past their deadline; returns how many actions it took."""
    if not runtime.store.try_sweeper_lock(owner, runtime.settings.sweep_interval_s * 0.9):
        return 0
    return _recover_lost_steps(runtime) + _fire_deadlines(runtime) + _fire_approval_timeouts(runtime)


def _recover_lost_steps(runtime: Runtime) -> int:
    count = 0
    expired = runtime.store.expired_leases()
    backlog_wait_s = _backlog_wait_s(runtime) if expired else 0.0
    for member in expired:
        _, step, old_task = keys.parse_lease_member(member)
        lost: ErrorRecord = {
            "type": "worker_lost",
            "status": None,
            "message": f"worker lost during attempt (task {old_task})",
        }
        if keys.parse_item_unit(step)[1] is not None:
            count += _recover_lost_item(runtime, member, lost, backlog_wait_s)
            continue
        found = runtime.store.reclaim(
            member, uuid.uuid4().hex, lost, grace_s=runtime.settings.queued_grace_s, backlog_wait_s=backlog_wait_s
        )
        if found is None:
            continue
        spec = runtime.store.load_definition(found.definition_hash)
        runtime.publisher.publish(
            spec, run_id=found.run_id, steps=[step], generation=found.generation, task_ids={step: found.task_id}
        )
        log.warning("re-dispatched %s/%s as task %s after its worker was lost", found.run_id, step, found.task_id)
        count += 1
    return count


def _recover_lost_item(runtime: Runtime, member: str, lost: ErrorRecord, backlog_wait_s: float) -> int:
    # An item of a map step: re-queued or sent again by its own script, published as a one-item group.
    found = runtime.store.reclaim_item(
        member, uuid.uuid4().hex, lost, grace_s=runtime.settings.queued_grace_s, backlog_wait_s=backlog_wait_s
    )
    if found is None:
        return 0
    spec = runtime.store.load_definition(found.definition_hash)
    runtime.publisher.publish_items(
        spec, run_id=found.run_id, step=found.step, generation=found.generation, items=[(found.index, found.task_id)]
    )
    log.warning("re-dispatched %s/%s[%d] as task %s", found.run_id, found.step, found.index, found.task_id)
    return 1


def _backlog_wait_s(runtime: Runtime) -> float:
    """How long a step nobody claimed may wait before it is sent again, while messages wait in the step queues.

    A step whose dispatch hold ran out while its queue still holds messages has most likely not been reached yet
    (10,000 runs submitted at once keep roots waiting longer than any grace): sending copies would only lengthen the
    queue. So while a backlog is seen the hold is extended, up to ``MAX_BACKLOG_GRACES`` graces since the step was
    queued; a lost message then waits that long at most. 0 (resend now) when the queues are empty or cannot be read.
    """
    broker = runtime.broker
    if broker is None:
        return 0.0
    try:
        depths = queue_depths(broker, (runtime.settings.llm_queue, runtime.settings.cpu_queue))
    except redis.RedisError:
        return 0.0
    return MAX_BACKLOG_GRACES * runtime.settings.queued_grace_s if any(depths.values()) else 0.0


def _fire_deadlines(runtime: Runtime) -> int:
    count = 0
    for run_id, generation in runtime.store.due_deadlines():
        try:
            result = stop_run(
                runtime.publisher,
                runtime.store,
                run_id,
                RunStatus.TIMED_OUT,
                DEADLINE_REASON,
                generation=generation,
                settings=runtime.settings,
            )
        except (RunNotFoundError, DefinitionNotFoundError):
            result = None
        runtime.store.drop_deadline(run_id, generation)
        if result is not None and result.outcome == StopOutcome.OK:
            log.warning("run %s timed out; interrupted %d steps", run_id, len(result.interrupted))
            count += 1
    return count


def _fire_approval_timeouts(runtime: Runtime) -> int:
    count = 0
    for run_id, generation, unit in runtime.store.due_approvals():
        step, item = keys.parse_item_unit(unit)  # an approval map step's items wait each under its own unit
        try:
            spec = runtime.store.load_definition(runtime.store.run_fields(run_id)["def_hash"])
            params = spec.steps_by_name[step].params
            on_timeout = params.on_timeout if isinstance(params, ApprovalParams) else "fail"
            decide_step(
                runtime.publisher,
                runtime.settings,
                runtime.store,
                run_id,
                step,
                decision=f"timeout:{on_timeout}",
                by=TIMEOUT_PRINCIPAL,
                timed_out=True,
                generation=generation,
                item=item,
            )
            count += 1
        except (RunNotFoundError, DefinitionNotFoundError, DecisionRefusedError, InputValidationError, KeyError):
            pass  # decided meanwhile, or the run ended or expired: nothing left to time out
        runtime.store.drop_approval(run_id, generation, unit)
    return count
