"""The Redis store's step transitions: claim, finish, retry, defer, renew and reclaim, each one Lua script."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from redis.client import Pipeline

from orchestrator.domain import (
    Attempt,
    Claim,
    ClaimOutcome,
    FinishResult,
    KeepCandidate,
    KeepRequest,
    ReclaimedStep,
    ReleaseRules,
    StepOutcome,
)
from orchestrator.errors import DeferralRecord, ErrorRecord
from orchestrator.infra.ids import new_id
from orchestrator.infra.json_text import compact
from orchestrator.infra.redis_cluster import is_cluster_client
from orchestrator.infra.redis_roundtrip import execute
from orchestrator.state import keys
from orchestrator.state.base import failure_line, releasable, rules_json, success_detail
from orchestrator.state.items import split_item_leases
from orchestrator.state.owed import OwedWrite, OwedWrites
from orchestrator.state.redis.core import RedisStateCore, _run_keys, _text
from orchestrator.state.redis.items import renew_items


class StepTransitions(RedisStateCore):
    """Claim, finish, retry, defer, renew and reclaim a step's attempts, and keep the lease index in step."""

    # -- step transitions ----------------------------------------------------------------------------------------

    def claim(
        self,
        attempt: Attempt,
        *,
        lease_s: float,
        upstream: tuple[str, ...],
        children: tuple[str, ...],
        carrier: str = "",
    ) -> Claim:
        """Start an attempt of a step if this message may run it (see ``lua/claim.lua``).

        The attempt enters the lease index in the same round trip, before the claim: a worker that dies right after
        claiming can then never leave a running step the sweeper cannot see.

        ``upstream`` names the steps whose status and output the attempt needs; ``children`` lets a duplicate
        delivery of a finished step find children whose dispatch was lost. ``carrier`` is the task id of the message
        whose worker slot runs the step when it continues locally after its parent (a cancel revokes it too).
        """
        run_id, step, generation, task_id = attempt.run_id, attempt.step, attempt.generation, attempt.task_id
        member = keys.lease_member(run_id, step, task_id)
        argv: list[Any] = [step, generation, task_id, lease_s, len(upstream), *upstream, len(children), *children]
        if carrier:
            argv.append(carrier)
        replies = self._pipeline(
            lambda pipe: self._evalsha(pipe, "claim", run_id, argv),
            before=(lambda pipe: pipe.zadd(self._leases(run_id), {member: time.time() + lease_s}),),
        )
        got = _claim_reply([_text(x) for x in replies[1]], upstream, children)
        if not _keeps_lease(got):
            self.client.zrem(self._leases(run_id), member)
        return got

    def finish(
        self,
        attempt: Attempt,
        outcome: StepOutcome,
        *,
        output: Any = None,
        error: ErrorRecord | None = None,
        children: tuple[str, ...] = (),
        cache_key: str = "",
        cached: bool = False,
        grace_s: float = 300.0,
        rules: ReleaseRules | None = None,
        keep: KeepRequest | None = None,
        owed: OwedWrites | None = None,
        then: Sequence[OwedWrite] = (),
    ) -> FinishResult:
        """Record a final outcome and release the children it decides (see ``lua/finish.lua``).

        ``cached`` marks a success served from the step's stored result (its output is then kept as it is). With
        ``keep``, the same script claims the first ``keep.most`` released candidates for this worker (one round trip
        for the hop). What the attempt ``owed`` Redis (its LLM calls' closes) goes first in the same round trip, and
        ``then``'s writes (kept children's LLM opens) last, after the script that claims them.

        When the run ends, the script also drops its deadline and announces its end, and answers its parent run: on
        a single Redis the run's end costs no round trip of its own. In a cluster the deadline index and the global
        stream live on other slots than the run, so one more round trip does both.
        """
        run_id, step, generation, task_id = attempt.run_id, attempt.step, attempt.generation, attempt.task_id
        # Each step this finish releases is covered in the lease index, under the task id its message will carry: a
        # worker dying between the finish and the publish, or a message lost in the broker, leaves the sweeper
        # something to send again. On a single Redis the script covers the steps it releases itself; in a cluster
        # (the index on another slot) every step it may release is covered before it, and the rest taken back.
        cluster = is_cluster_client(self.client)
        chosen = {c.step: c.task_id for c in keep.candidates if c.task_id} if keep is not None else {}
        held = {child: chosen.get(child) or new_id() for child in releasable(children, rules)}
        candidates = {c.step: c for c in keep.candidates if c.step in held} if keep is not None else {}
        keep_argv: list[Any] = []
        if keep is not None and candidates:
            keep_argv = [keep.lease_s, keep.carrier, max(1, keep.most)]
            for c in candidates.values():
                keep_argv += [c.step, held[c.step], len(c.upstream), *c.upstream, len(c.children), *c.children]
        argv: list[Any] = [
            step,
            generation,
            task_id,
            outcome.value,
            (output_json := "" if output is None else compact(output)),
            "" if error is None else compact(error),
            self.retention_s,
            cache_key,
            "1" if cached else "",
            success_detail(output),
            rules_json(rules),
            failure_line(attempt.step, outcome, error),
            run_id,
            keys.deadline_member(run_id, generation),
            self._announced_maxlen,
            len(keep_argv),
            *keep_argv,
        ]
        clock = time.time()
        # A candidate the script may claim is entered with the claim's lease, as a claim enters it; one released but
        # not kept with the grace, as its message is published after the reply.
        lease_due = clock + keep.lease_s if keep is not None else clock
        before: tuple[Callable[[Pipeline], Any], ...] = ()
        if not cluster:
            argv += [lease_due, clock + grace_s, len(held), *(x for pair in held.items() for x in pair)]
        elif held:
            due = {c: lease_due if c in candidates else clock + grace_s for c in held}
            members = {keys.lease_member(run_id, c, t): due[c] for c, t in held.items()}
            before = (lambda pipe: pipe.zadd(self._leases(run_id), cast(Any, members)),)
        argv += children
        # The run's end and the covers, written by the script itself where it may touch keys of other slots (a
        # single Redis).
        run_end = (
            ()
            if cluster
            else (self._deadlines(run_id), keys.global_events_key(self._shard(run_id)), self._leases(run_id))
        )
        replies = self._pipeline(
            lambda pipe: self._evalsha(pipe, "finish", run_id, argv, more_keys=run_end),
            before=before,
            after=(lambda pipe: pipe.zrem(self._leases(run_id), keys.lease_member(run_id, step, task_id)),),
            owed=owed,
            then=then,
        )
        reply = [_text(x) for x in replies[1 if before else 0]]
        ok = reply[0] == "ok"
        count = int(reply[2]) if ok else 0
        released = tuple(reply[3 : 3 + count])
        n_cancelled = int(reply[3 + count]) if ok else 0
        rest = reply[4 + count : 4 + count + n_cancelled]
        cancelled = tuple((rest[i], rest[i + 1]) for i in range(0, len(rest), 2))
        tail = reply[4 + count + n_cancelled :]
        ended = ok and reply[1] != ""
        # An ended run answers its parent run and workflow; a run going on, the children it kept for the slot.
        parent_run, workflow = (tail[0], tail[1]) if ended else ("", "")
        claims = _kept_claims(tail, candidates, output_json) if ok and not ended else {}
        # A refused finish leaves the covers in place (written by a first application of this very finish, or in a
        # cluster ahead of this one): it may be this finish applied once already, its reply lost to a connection
        # that dropped (redis-py then sends it again), with its children released and some perhaps claimed for this
        # slot under these task ids. The sweeper drops a cover whose task no step holds when it falls due.
        stale = [keys.lease_member(run_id, s, t) for s, t in cancelled if t]
        regrace: dict[str, float] = {}
        if cluster and ok:
            stale += _uncovered(run_id, held, released, claims)
            regrace = {
                keys.lease_member(run_id, c, held[c]): clock + grace_s
                for c in released
                if c in candidates and c not in claims
            }
        if stale or regrace or (ended and cluster):
            pipe = self.client.pipeline(transaction=False)
            if stale:
                pipe.zrem(self._leases(run_id), *stale)
            if regrace:
                pipe.zadd(self._leases(run_id), cast(Any, regrace), xx=True)
            if ended and cluster:
                pipe.zrem(self._deadlines(run_id), keys.deadline_member(run_id, generation))
                self._announce(pipe, run_id, f"run_{reply[1]}", workflow)
            execute(pipe)
        if not ok:
            return FinishResult(recorded=False)
        return FinishResult(
            recorded=True,
            run_status=reply[1] or None,
            released=released,
            task_ids={c: held[c] for c in released},
            cancelled=cancelled,
            kept_claims=claims,
            parent_run=parent_run or None,
        )

    def hold_dispatch(self, run_id: str, task_ids: dict[str, str], grace_s: float) -> None:
        """Cover steps about to be published in the lease index, so the sweeper resends a message that is lost."""
        if task_ids:
            due = time.time() + grace_s
            members = {keys.lease_member(run_id, s, t): due for s, t in task_ids.items()}
            self.client.zadd(self._leases(run_id), cast(Any, members))

    def retry(self, attempt: Attempt, error: ErrorRecord, *, countdown_s: float, grace_s: float) -> bool:
        """Record a retryable error and put the step back to ``queued`` for ``countdown_s``.

        The attempt stays in the lease index until ``countdown_s + grace_s`` (Celery's retry keeps the task id), so
        a delayed retry lost with its worker is sent again. ``False`` when the attempt is stale.
        """
        run_id, step, generation, task_id = attempt.run_id, attempt.step, attempt.generation, attempt.task_id
        argv: list[Any] = [step, generation, task_id, json.dumps(error), countdown_s, grace_s]
        lease = self._scripts["retry"](keys=_run_keys(run_id), args=argv)
        if lease is None:
            return False
        self.client.zadd(self._leases(run_id), {keys.lease_member(run_id, step, task_id): float(_text(lease))})
        return True

    def defer(self, attempt: Attempt, deferral: DeferralRecord, *, countdown_s: float, grace_s: float) -> bool:
        """Put a running step back to ``queued`` for ``countdown_s`` without counting the attempt (see ``defer.lua``).

        ``False`` when the attempt is stale.
        """
        run_id, step, generation, task_id = attempt.run_id, attempt.step, attempt.generation, attempt.task_id
        argv: list[Any] = [step, generation, task_id, countdown_s, grace_s, json.dumps(deferral)]
        lease = self._scripts["defer"](keys=_run_keys(run_id), args=argv)
        if lease is None:
            return False
        self.client.zadd(self._leases(run_id), {keys.lease_member(run_id, step, task_id): float(_text(lease))})
        return True

    def renew(self, leases: dict[str, list[tuple[str, str]]], lease_s: float) -> list[tuple[str, str, str, bool]]:
        """Extend the leases of running attempts, grouped by run id; returns each with whether it is still ours.

        Items of map steps (``STEP#INDEX``) are renewed too, by ``lua/item_renew.lua``, and not listed.
        """
        leases, items = split_item_leases(leases)
        if items:
            renew_items(self, items, lease_s)
        order = list(leases.items())
        lease_end = self.clock.now() + lease_s
        calls = []
        for run_id, pairs in order:
            argv: list[Any] = [f"{lease_end:.6f}"]
            for step, task_id in pairs:
                argv += [step, task_id]
            calls.append(functools.partial(self._evalsha, script="renew", run_id=run_id, argv=argv))
        replies = self._pipeline(*calls)
        out: list[tuple[str, str, str, bool]] = []
        index: dict[str, float] = {}
        for (run_id, pairs), reply in zip(order, replies, strict=True):
            for (step, task_id), flag in zip(pairs, reply, strict=True):
                out.append((run_id, step, task_id, bool(int(flag))))
                if int(flag):
                    index[keys.lease_member(run_id, step, task_id)] = lease_end
        for bucket, members in self._lease_buckets(index).items():
            self.client.zadd(bucket, cast(Any, members), xx=True)
        return out

    def expired_leases(self, limit: int = 500, buckets: Sequence[str | None] | None = None) -> list[str]:
        """Lease index members whose lease ran out, by Redis's clock."""
        return self._due(keys.leases_key, limit, buckets)

    def reclaim(
        self,
        member: str,
        new_task_id: str,
        error: ErrorRecord,
        *,
        grace_s: float,
        backlog_wait_s: float = 0.0,
        owner_dead: bool = False,
    ) -> ReclaimedStep | None:
        """Recover the step behind an expired lease (see ``lua/reclaim.lua``).

        Returns:
            What to publish, or ``None`` when there is nothing to do (the lease is live again, or the attempt ended).
        """
        run_id, step, task_id = keys.parse_lease_member(member)
        argv: list[Any] = [step, task_id, new_task_id, json.dumps(error), grace_s, backlog_wait_s, int(owner_dead)]
        reply = [_text(x) for x in self._scripts["reclaim"](keys=_run_keys(run_id), args=argv)]
        if reply[0] == "live":
            # The heartbeat renewed it after we read the index: keep it findable at its new expiry.
            self.client.zadd(self._leases(run_id), {member: float(reply[1])})
            return None
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(self._leases(run_id), member)
        if reply[0] == "ok":
            pipe.zadd(self._leases(run_id), {keys.lease_member(run_id, step, reply[3]): float(reply[4])})
        pipe.execute()
        if reply[0] != "ok":
            return None
        return ReclaimedStep(run_id=run_id, step=step, definition_hash=reply[1], generation=reply[2], task_id=reply[3])


def _claim_reply(
    reply: list[str], upstream: tuple[str, ...], children: tuple[str, ...], parent_json: str = ""
) -> Claim:
    """A claim as ``claim_step`` (``lua/_claim.lua``) answered it, from ``claim.lua`` or within ``finish.lua``
    (where ``=`` stands for the output of the finishing parent, ``parent_json``)."""
    outcome = ClaimOutcome(reply[0])
    if outcome == ClaimOutcome.OK:
        rows = reply[9:]
        return Claim(
            outcome=ClaimOutcome.OK,
            attempt=int(reply[1]),
            generation_attempt=int(reply[1]) - int(reply[5] or 0),
            now=float(reply[2]),
            errors=json.loads(reply[3]) if reply[3] else [],
            inputs=json.loads(reply[4]),
            cache_key=reply[6],
            force=reply[7] == "1",
            queued_at=float(reply[8]) if reply[8] else None,
            parent_status={p: rows[2 * i] for i, p in enumerate(upstream)},
            parent_output={p: _output(rows[2 * i + 1], parent_json) for i, p in enumerate(upstream)},
        )
    if outcome == ClaimOutcome.DONE:
        rows = reply[2:]
        waiting = tuple(c for i, c in enumerate(children) if rows[2 * i] == "queued" and rows[2 * i + 1] == "")
        return Claim(outcome=ClaimOutcome.DONE, detail=reply[1], unclaimed_children=waiting)
    return Claim(outcome=outcome, detail=reply[1] if len(reply) > 1 else "")


def _output(stored: str, parent_json: str) -> Any:
    if stored == "=":
        stored = parent_json
    return json.loads(stored) if stored else None


def _kept_claims(tail: list[str], candidates: dict[str, KeepCandidate], output_json: str) -> dict[str, Claim]:
    """The children ``finish.lua`` claimed for the slot, in release order: ``n_kept, (child, n_reply, reply...)...``
    (nothing without a keep request); ``output_json``: what the finish wrote as its step's output."""
    claims: dict[str, Claim] = {}
    if not tail:
        return claims
    at = 1
    for _ in range(int(tail[0])):
        child, size = tail[at], int(tail[at + 1])
        claims[child] = _claim_reply(
            tail[at + 2 : at + 2 + size], candidates[child].upstream, candidates[child].children, output_json
        )
        at += 2 + size
    return claims


def _uncovered(run_id: str, held: dict[str, str], released: tuple[str, ...], claims: dict[str, Claim]) -> list[str]:
    """The covers a finish put in the lease index ahead of its script (a cluster) that must go again: of the steps it
    did not release, and of those it kept for the slot whose claim was refused."""
    gone = [keys.lease_member(run_id, c, t) for c, t in held.items() if c not in released]
    return gone + [keys.lease_member(run_id, c, held[c]) for c, got in claims.items() if not _keeps_lease(got)]


def _keeps_lease(claim: Claim) -> bool:
    """Whether a claim leaves its attempt's lease index entry in place: it started, or the attempt runs already."""
    return claim.outcome == ClaimOutcome.OK or (claim.outcome == ClaimOutcome.BUSY and claim.detail == "own")
