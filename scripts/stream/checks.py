"""What the clients saw against what the runs wrote: exactly once and in order, and the latencies by type and second."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from orchestrator import Client
from scripts.harness.stats import summary_ms
from scripts.stream.clients import StreamRecord


def check_streams(
    records: Sequence[StreamRecord], expected: dict[str, list[tuple[int, str, str | None, int]]]
) -> dict[str, Any]:
    """Whether every client got exactly its run's events, once each, in order; and what went wrong otherwise."""
    out: dict[str, Any] = {
        "clients": len(records),
        "exact": 0,
        "missing": 0,
        "duplicated": 0,
        "out_of_order": 0,
        "unexpected": 0,
        "frame_errors": 0,
        "incomplete": 0,
        "runs_not_succeeded": 0,
        "reconnects": 0,
        "drops": 0,
        "http_204": 0,
        "examples": [],
    }
    for record in records:
        want = expected.get(record.run_id, [])
        got = [e[:4] for e in record.events]
        out["reconnects"] += record.reconnects
        out["drops"] += len(record.drops)
        out["http_204"] += int(record.got_204)
        out["frame_errors"] += len(record.frame_errors)
        if not want or want[-1][1] != "run_succeeded":
            out["runs_not_succeeded"] += 1
        if got == want and not record.frame_errors:
            out["exact"] += 1
            continue
        seen = set(got)
        missing = [e for e in want if e not in seen]
        out["missing"] += len(missing)
        out["duplicated"] += len(got) - len(seen)
        out["unexpected"] += len(seen - set(want))
        out["out_of_order"] += int([s for s, *_ in got] != sorted(s for s, *_ in got))
        out["incomplete"] += int(not record.final_seen)
        if len(out["examples"]) < 5:
            out["examples"].append(
                {
                    "run_id": record.run_id,
                    "got_seqs": [s for s, *_ in got],
                    "want_seqs": [s for s, *_ in want],
                    "drops": record.drops[:5],
                    "frame_errors": record.frame_errors[:3],
                    "error": record.error,
                }
            )
    out["all_exact"] = out["exact"] == len(records)
    return out


def expected_events(client: Client, run_ids: Iterable[str]) -> dict[str, list[tuple[int, str, str | None, int]]]:
    """Each run's events as the store holds them: what every client of the run must have received."""
    return {rid: [(e.seq, e.type, e.step, e.attempt) for e in client.store.events(rid)] for rid in set(run_ids)}


def stream_timings(records: Sequence[StreamRecord]) -> dict[str, Any]:
    connect = [r.t_open - r.t_request for r in records if r.t_open is not None and r.t_request is not None]
    eof = [r.t_eof - r.t_final for r in records if r.t_eof is not None and r.t_final is not None]
    frames = sum(len(r.events) for r in records)
    statuses = Counter(code for r in records for code in r.statuses)
    drops = Counter(reason.split(":", 1)[0] for r in records for reason in r.drops)
    return {
        "connect_ms": summary_ms(connect),
        "final_event_to_eof_ms": summary_ms(eof),
        "frames": frames,
        "pings": sum(r.pings for r in records),
        "http_statuses": {str(k): v for k, v in sorted(statuses.items())},
        "drop_reasons": dict(drops.most_common()),
        "drop_examples": list(dict.fromkeys(reason[:300] for r in records for reason in r.drops))[:8],
        "gave_up": sum(1 for r in records if r.error),
    }


def per_frame_us(cpu: dict[str, Any], frames: int) -> dict[str, float]:
    """CPU microseconds per delivered frame: the API's (serving) and this process's (receiving)."""
    if not frames:
        return {}
    return {"api": cpu["cpu_s"]["api"] / frames * 1e6, "bench_clients": cpu["cpu_s"]["bench_clients"] / frames * 1e6}


def by_second_ms(samples: Iterable[tuple[float, float]]) -> list[dict[str, float]]:
    """Latency summaries of (seconds since a start, latency) samples, per whole second: shows whether a tail is one
    stall or spread out."""
    groups: dict[int, list[float]] = defaultdict(list)
    for since, latency in samples:
        groups[int(since)].append(latency)
    return [
        {"second": sec, **{k: round(v, 2) for k, v in summary_ms(vals).items() if k in {"n", "p50", "p99", "max"}}}
        for sec, vals in sorted(groups.items())
    ]


def by_type_ms(samples: Iterable[tuple[str, float]]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for kind, latency in samples:
        groups[kind].append(latency)
    return {
        kind: {k: v for k, v in summary_ms(vals).items() if k in {"n", "p50", "p99"}}
        for kind, vals in sorted(groups.items())
    }
