"""The sweep: recovers steps whose worker was lost, fires workflow deadlines and approval timeouts.

It runs in every worker's main process (a Celery bootstep, :mod:`workers.sweeper`) and in ``orchestrator sweeper``
(:mod:`orchestrator.engine.sweep_service`). With one bucket per global index (``ORCH_SHARDS=1``) a short Redis lock lets
one process sweep per interval. With ``ORCH_SHARDS=N`` above 1 each bucket is swept on its own: the live sweepers
split the N buckets between them (:meth:`~orchestrator.state.StateStore.sweep_buckets`), each sweeping the expired
leases, deadlines and approval timeouts of the buckets it holds, so the sweep's work and Redis traffic spread over
sweepers and masters; a stopped sweeper's buckets are taken over within a few intervals. The owners index
(``orch:owners``, one key) is swept by whoever holds the first bucket. Deadlines are durable (a sorted set in Redis):
one that passed while no worker ran fires when the first sweep runs.
"""

from __future__ import annotations

import logging
import time

import redis

from orchestrator.definition.spec import ApprovalParams
from orchestrator.domain import ReclaimedItem, RunStatus, StopOutcome
from orchestrator.engine.backlog import oldest_sent_at
from orchestrator.engine.control import DEADLINE_REASON, decide_step, stop_run
from orchestrator.engine.runtime import Runtime
from orchestrator.errors import (
    DecisionRefusedError,
    DefinitionNotFoundError,
    ErrorRecord,
    InputValidationError,
    RunNotFoundError,
)
from orchestrator.infra.ids import new_id
from orchestrator.principals import TIMEOUT_PRINCIPAL
from orchestrator.state import keys

log = logging.getLogger(__name__)

MAX_BACKLOG_GRACES = 8
"""While the step queues hold a backlog, a step nobody claimed is sent again only after this many graces."""
SENT_CLOCK_MARGIN_S = 2.0
"""How much later than its step was queued a message may have been sent (the publish follows the transition that
queued the step by milliseconds, and clocks of hosts differ a little): the sweeper holds a copy back only while a
message sent before that could still be waiting."""


def sweep_once(runtime: Runtime, owner: str) -> int:
    """One sweep: re-dispatch lost steps, time out runs past their deadline; returns how many actions it took."""
    buckets = runtime.store.sweep_buckets(owner, runtime.settings.sweep_interval_s)
    if not buckets:
        return 0
    owners = _recover_dead_owners(runtime) if keys.all_shards(runtime.settings.shards)[0] in buckets else 0
    return (
        owners
        + _recover_lost_steps(runtime, buckets)
        + _fire_deadlines(runtime, buckets)
        + _fire_approval_timeouts(runtime, buckets)
    )


def _recover_dead_owners(runtime: Runtime) -> int:
    """Re-queue at once the attempts of processes whose heartbeat ran out (:mod:`orchestrator.engine.leases`)."""
    count = 0
    for dead in runtime.store.dead_owners():
        members = runtime.store.owned(dead)
        for member in members:
            count += _recover(runtime, member, backlog_wait_s=0.0, owner_dead=True)
        runtime.store.forget_owner(dead, members)
        if members:
            log.warning("process %s stopped beating; recovered its %d attempts", dead, len(members))
    return count


def _recover_lost_steps(runtime: Runtime, buckets: list[str | None]) -> int:
    count = 0
    expired = runtime.store.expired_leases(buckets=buckets)
    backlog_wait_s = _backlog_wait_s(runtime) if expired else 0.0
    for member in expired:
        count += _recover(runtime, member, backlog_wait_s=backlog_wait_s)
    return count


def _recover(runtime: Runtime, member: str, *, backlog_wait_s: float, owner_dead: bool = False) -> int:
    """Re-queue or resend the attempt behind a lease index ``member``; 1 when a message went out."""
    _, step, old_task = keys.parse_lease_member(member)
    lost: ErrorRecord = {
        "type": "worker_lost",
        "status": None,
        "message": f"worker lost during attempt (task {old_task})",
    }
    # An item of a map step is re-queued or sent again by its own script, and published as a one-item group.
    is_item = keys.parse_item_unit(step)[1] is not None
    reclaim = runtime.store.reclaim_item if is_item else runtime.store.reclaim
    found = reclaim(
        member,
        new_id(),
        lost,
        grace_s=runtime.settings.queued_grace_s,
        backlog_wait_s=backlog_wait_s,
        owner_dead=owner_dead,
    )
    if found is None:
        return 0
    spec = runtime.store.load_definition(found.definition_hash)
    if isinstance(found, ReclaimedItem):
        item = (found.index, found.task_id)
        runtime.publisher.publish_items(
            spec, run_id=found.run_id, step=found.step, generation=found.generation, items=[item]
        )
        log.warning("re-dispatched %s/%s[%d] as task %s", found.run_id, found.step, found.index, found.task_id)
    else:
        runtime.publisher.publish(
            spec, run_id=found.run_id, steps=[step], generation=found.generation, task_ids={step: found.task_id}
        )
        log.warning("re-dispatched %s/%s as task %s after its worker was lost", found.run_id, step, found.task_id)
    return 1


def _backlog_wait_s(runtime: Runtime) -> float:
    """How long since it was queued a step nobody claimed may wait before it is sent again, given the step queues.

    A step whose dispatch hold ran out may not have been reached yet: 10,000 runs submitted at once keep roots
    waiting longer than any grace, and sending copies would only lengthen the queue. But a step queue is first in,
    first out, so its message can only still be waiting if the oldest message waiting now was sent before it. So the
    hold of a step queued up to ``SENT_CLOCK_MARGIN_S`` after the oldest waiting message was sent is extended (a
    queued step's message is sent right after), up to ``MAX_BACKLOG_GRACES`` graces since the step was queued; a step
    queued later than that has no message left in the queues: it was lost with a worker, or never published, and is
    sent again at once. A busy system with short queues therefore resends a lost message after one grace, not after
    eight, and a backlog that really holds the step still sends no copy. 0 (resend now) when the queues are empty or
    cannot be read.
    """
    broker = runtime.broker
    if broker is None:
        return 0.0
    try:
        oldest = oldest_sent_at(broker, (runtime.settings.llm_queue, runtime.settings.cpu_queue))
    except redis.RedisError:
        return 0.0
    if oldest is None:
        return 0.0
    # reclaim extends the hold while (now - queued_at) < this, that is while queued_at > oldest - margin.
    waited = max(0.0, time.time() - oldest + SENT_CLOCK_MARGIN_S)
    return min(MAX_BACKLOG_GRACES * runtime.settings.queued_grace_s, waited)


def _fire_deadlines(runtime: Runtime, buckets: list[str | None]) -> int:
    count = 0
    for run_id, generation in runtime.store.due_deadlines(buckets=buckets):
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


def _fire_approval_timeouts(runtime: Runtime, buckets: list[str | None]) -> int:
    count = 0
    for run_id, generation, unit in runtime.store.due_approvals(buckets=buckets):
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
