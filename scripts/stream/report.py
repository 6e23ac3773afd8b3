"""The SSE benchmark's medians over repetitions and its printed report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from scripts.harness.report import fmt, print_table
from scripts.harness.stats import median


def _fmt(value: float | None, digits: int = 1) -> str:
    return fmt(value, digits)


def aggregate(reps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repetitions of the headline figures, and the correctness totals."""
    checks = [r["check"] for r in reps]
    return {
        "reps": len(reps),
        "latency_p50_ms": median(r["latency_ms"]["p50"] for r in reps),
        "latency_p99_ms": median(r["latency_ms"]["p99"] for r in reps),
        "latency_max_ms": max((r["latency_ms"]["max"] for r in reps), default=math.nan),
        "latency_samples": sum(r["latency_ms"]["n"] for r in reps),
        "api_cpu_s": median(r["cpu_total"]["api_cpu_s"] for r in reps),
        "api_core_pct": median(r["cpu_total"]["api_core_pct"] for r in reps),
        "window_s": median(r["cpu_total"]["wall_s"] for r in reps),
        "api_rss_peak_mb": max((r["resources"]["api_rss_peak_mb"] for r in reps), default=math.nan),
        "api_rss_start_mb": median(r["resources"]["api_rss_start_mb"] for r in reps),
        "loop_lag_p99_ms": median(r["resources"]["loop_lag_ms"]["p99"] for r in reps),
        "clients": sum(c["clients"] for c in checks),
        "exact": sum(c["exact"] for c in checks),
        "reconnects": sum(c["reconnects"] for c in checks),
        "drops": sum(c["drops"] for c in checks),
        "all_exact": all(c["all_exact"] for c in checks),
    }


def print_report(results: dict[str, Any]) -> None:
    cfg, env = results["config"], results["environment"]
    clock = results["clock"]
    pool = cfg["api_redis_pool"]
    what_if = f" (WHAT-IF: the API's asyncio Redis pool has max_connections={pool})" if pool else ""
    if cfg["api_pythonpath"]:
        what_if += f" (WHAT-IF: API PYTHONPATH starts with {cfg['api_pythonpath']})"
    what_if += f"; hiredis in the API: {env.get('api_hiredis')}"
    print()
    print(
        f"SSE delivery benchmark: {cfg['workers']} workers x {cfg['pool']} c{cfg['concurrency']}; API pid "
        f"{env['api_pid']}{' (under cProfile: figures inflated)' if cfg['profile'] else ''}{what_if}; Redis TIME - "
        f"time.time() = {clock['offset_us']:+.0f} µs (± {clock['rtt_us'] / 2:.0f} µs)"
    )
    rows = [
        (
            "scenario",
            "reps",
            "clients",
            "live ev",
            "p50 ms",
            "p99 ms",
            "max ms",
            "API CPU s",
            "% core",
            "window s",
            "RSS MB",
            "lag p99",
            "exact",
            "reconn",
        )
    ]
    labels = {"one_run": f"(1) {cfg['clients']} clients, 1 run", "many_runs": f"(2) {cfg['runs']} runs x 1 client"}
    for key, label in labels.items():
        a = results["summary"][key]
        rows.append(
            (
                label,
                str(a["reps"]),
                str(a["clients"]),
                str(a["latency_samples"]),
                _fmt(a["latency_p50_ms"]),
                _fmt(a["latency_p99_ms"]),
                _fmt(a["latency_max_ms"]),
                _fmt(a["api_cpu_s"], 2),
                _fmt(a["api_core_pct"], 0),
                _fmt(a["window_s"]),
                f"{_fmt(a['api_rss_start_mb'], 0)}→{_fmt(a['api_rss_peak_mb'], 0)}",
                _fmt(a["loop_lag_p99_ms"]),
                f"{a['exact']}/{a['clients']}",
                str(a["reconnects"]),
            )
        )
    print_table(rows)
    print(
        "(latency: event ts → client receive, medians over reps of each rep's p50/p99; max over all; API CPU and "
        "% of one core over the whole window; RSS: at window start → peak; lag: the clients' own loop lag p99)"
    )
    for r in results["one_run"]:
        fo, live, conn = r["fan_out_ms"], r["cpu_live"], r["streams"]["connect_ms"]
        print(
            f"  (1) {r['clients']} clients: {r['events_per_run']} events/run ({r['backlog_events_per_client']} "
            f"before the gate, replayed); connect p50/p99 {_fmt(conn['p50'])}/{_fmt(conn['p99'])} ms, all caught up "
            f"in {r['connect_phase_s']:.2f}s; live part {live['wall_s']:.2f}s: API {live['api_cpu_s']:.2f}s CPU "
            f"({live['api_core_pct']:.0f}% core); per event first client p50 {_fmt(fo['first_client_ms']['p50'])} ms,"
            f" last client p50 {_fmt(fo['last_client_ms']['p50'])} / p99 {_fmt(fo['last_client_ms']['p99'])} ms"
        )
    for r in results["many_runs"]:
        res, conn, live = r["resources"], r["streams"]["connect_ms"], r["cpu_live"]
        print(
            f"  (2) {r['runs']} runs: submitted in {r['submit_phase_s']:.1f}s (workers paused); "
            f"{r['clients_caught_up_at_release']} clients connected and caught up after {r['connect_phase_s']:.1f}s "
            f"(connect p50/p99 {_fmt(conn['p50'])}/{_fmt(conn['p99'])} ms; API {r['cpu_connect']['api_cpu_s']:.2f}s "
            f"CPU); released: last run ended {r['release_to_last_run_end_s']:.1f}s later; live part API "
            f"{live['api_cpu_s']:.2f}s CPU ({live['api_core_pct']:.0f}% core); peak {res['open_streams_peak']} open "
            f"streams, {res['redis_clients_peak']} Redis clients, {res['api_fds_peak']} API fds; "
            f"{r['not_live_events']} of {r['frames']} frames not live (before release or connect)"
        )
    for key, label in labels.items():
        for i, r in enumerate(results[key]):
            print(f"  {label} rep {i + 1}: {_trouble_line(r)}")
    print("CPU seconds by process over each window (medians):")
    for key, label in labels.items():
        reps = results[key]
        roles = reps[0]["cpu_total"]["cpu_s"].keys() if reps else []
        parts = ", ".join(f"{role} {median(r['cpu_total']['cpu_s'][role] for r in reps):.2f}" for role in roles)
        machine = median(r["cpu_total"]["all_cpu_pct_of_machine"] for r in reps)
        print(f"  {label:<28} {parts}  (= {machine:.0f}% of the machine's {env['cpus']} CPUs)")
    load = env["loadavg_1_5_15_before"], env["loadavg_1_5_15_after"]
    print(
        f"Machine: {env['cpus']} CPUs, load average (1/5/15 min) {'/'.join(f'{x:.2f}' for x in load[0])} before, "
        f"{'/'.join(f'{x:.2f}' for x in load[1])} after (shared with other work)"
    )
    for key, label in labels.items():
        for r in results[key]:
            check = r["check"]
            if not check["all_exact"]:
                print(
                    f"  {label}: {check['clients'] - check['exact']} clients saw wrong events: missing "
                    f"{check['missing']}, duplicated {check['duplicated']}, unexpected {check['unexpected']}, "
                    f"out of order {check['out_of_order']}, frame errors {check['frame_errors']}, incomplete "
                    f"{check['incomplete']}; e.g. {check['examples'][:1]}"
                )
    if results.get("profile"):
        print("API event-loop thread under cProfile, top functions by own time (s):")
        for line in results["profile"]["top_tottime"][:20]:
            print(f"  {line}")


def _trouble_line(result: dict[str, Any]) -> str:
    streams, per_frame = result["streams"], result.get("cpu_us_per_frame", {})
    log = {k: v for k, v in result["resources"].get("api_log", {}).items() if v}
    return (
        f"HTTP {streams['http_statuses']}, drops {streams['drop_reasons'] or 0}, gave up {streams['gave_up']}; "
        f"API log {log or 'clean'}; CPU per frame: API {_fmt(per_frame.get('api'), 0)} µs, clients "
        f"{_fmt(per_frame.get('bench_clients'), 0)} µs"
    )
