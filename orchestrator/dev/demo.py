"""``orchestrator demo``: the content pipeline end to end on real worker processes it starts and stops itself."""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from orchestrator.client import Client
from orchestrator.dev.local_workers import LocalWorkers
from orchestrator.dev.redis_server import ensure_redis, stop_on_signals
from orchestrator.engine.status import RunView, StepView
from orchestrator.infra.settings import Settings

DEMO_MODULE = "examples.content_pipeline"
_MARK = {"succeeded": "[green]✓[/]", "failed": "[red]✗[/]", "upstream_failed": "[red]⊘[/]", "skipped": "[yellow]↷[/]"}


def run_demo(settings: Settings, *, topic: str, workers: int = 2, concurrency: int = 4, console: Console) -> int:
    """Run the demo; returns the process exit code (0 when the run succeeded)."""
    url, server = ensure_redis(settings.redis_url if settings.redis_url_explicit else None)
    with stop_on_signals(server):
        try:
            where = "an embedded Redis it started (stopped at the end)" if server else url.split("@")[-1]
            console.print(f"[bold]orchestrator demo[/]: Redis at {where}")
            imports = tuple(dict.fromkeys((*settings.imports, DEMO_MODULE)))
            settings = replace(settings, redis_url=url, imports=imports)
            client = Client(settings)
            env = {"REDIS_URL": url, "ORCH_IMPORTS": ",".join(imports)}
            log_dir = Path(tempfile.mkdtemp(prefix="orchestrator-demo-"))
            console.print(f"starting {workers} worker processes, {concurrency} slots each (logs in {log_dir}) …")
            with LocalWorkers(client.app, count=workers, concurrency=concurrency, env=env, log_dir=log_dir) as pool:
                console.print(f"workers ready: {', '.join(n.split('@')[0] for n in pool.processes)}")
                return _follow(client, topic, console)
        finally:
            if server is not None:
                server.stop()


def _follow(client: Client, topic: str, console: Console) -> int:
    started = time.monotonic()
    run_id = client.submit("content_pipeline_demo", {"topic": topic})
    console.print(f"submitted run [bold]{run_id}[/] (topic: {topic!r}); steps as they finish:")
    seen: dict[str, str] = {}
    while True:
        view = client.status(run_id)
        for name, step in view["steps"].items():
            status = step["status"]
            if seen.get(name) == status:
                continue
            seen[name] = status
            if status == "running":
                console.print(f"  [dim]{time.monotonic() - started:6.2f}s[/]  ▶ {name} started on a worker")
            elif status in _MARK:
                console.print(f"  [dim]{time.monotonic() - started:6.2f}s[/]  {_MARK[status]} {name} {_summary(step)}")
        if view["status"] not in {"running", "pending"}:
            break
        time.sleep(0.05)
    _print_outputs(view, console)
    ok = view["status"] == "succeeded"
    colour = "green" if ok else "red"
    console.print(f"[bold {colour}]run {view['status']}[/] in {time.monotonic() - started:.2f}s")
    if not ok and view.get("error"):
        console.print(f"[red]{view['error']}[/]")
    return 0 if ok else 1


def _summary(step: StepView) -> str:
    out = step.get("output")
    parts = [f"attempts={step['attempts']}"]
    if isinstance(out, dict) and "word_count" in out:
        parts.append(f"{out['word_count']} words")
    if step.get("errors"):
        parts.append("retried after " + ", ".join(e.get("type", "?") for e in step["errors"]))
    return "(" + ", ".join(parts) + ")"


def _print_outputs(view: RunView, console: Console) -> None:
    console.print("\n[bold]outputs[/]")
    for name, step in view["steps"].items():
        out = step.get("output")
        if isinstance(out, dict) and "text" in out:
            text = out["text"].replace("\n", " ")
            console.print(f"  [bold]{name}[/]: {text[:160]}{'…' if len(text) > 160 else ''}")
            if "data" in out:
                console.print(f"    data: {out['data']}")
        elif out is not None:
            console.print(f"  [bold]{name}[/]: {out}")
    usage = view.get("usage")
    if usage:
        cost = view.get("cost")
        priced = f"; ${cost:.4f} at list prices over {view.get('llm_calls', 0)} paid calls" if cost is not None else ""
        console.print(f"  tokens: {usage['input_tokens']} in, {usage['output_tokens']} out{priced}")
    console.print()
