"""``orchestrator watch``: a live terminal view of a run, driven by its event stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from orchestrator.client import Client
from orchestrator.engine.deltas import Delta, DeltaFilter, texts_so_far
from orchestrator.engine.events import Event, EventType
from orchestrator.engine.status import RunView
from orchestrator.state import keys
from orchestrator.tables import money, run_totals, seconds, tokens

_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "upstream_failed": "red",
    "cancelled": "yellow",
    "skipped": "dim",
    "running": "cyan",
    "queued": "blue",
    "waiting": "magenta",
}
_FINAL = {"succeeded", "failed", "upstream_failed", "cancelled", "skipped"}
# After these the run's totals are read again (a step ended: its spend is settled), at most every _TOTALS_EVERY_S.
_SETTLED = {f"step_{kind}" for kind in _FINAL} | {"item_succeeded", "item_failed"}
_TOTALS_EVERY_S = 0.25
# A streaming step's text is shown as its last characters, for the few steps that streamed last.
_TEXT_TAIL_CHARS = 240
_TEXT_STEPS = 4
# An agent step's conversation is shown as its last lines (turns, tool calls and results), each cut to a line.
_TALK_LINES = 12
_TALK_LINE_CHARS = 160


@dataclass
class _StepRow:
    status: str = "pending"
    attempt: int = 0
    started: float | None = None
    finished: float | None = None
    note: str = ""
    cost: float | None = None
    usage: dict[str, Any] | None = None
    items_done: int = 0
    items_total: int | None = None


@dataclass
class WatchView:
    """What the watch shows, folded from the run's events (a pure reducer, tested without a terminal)."""

    run_id: str
    workflow: str
    steps: dict[str, _StepRow] = field(default_factory=dict)
    status: str = "running"
    last_seq: int = 0
    totals: RunView | None = None
    clock: Callable[[], float] = time.time
    texts: dict[str, str] = field(default_factory=dict)
    talk: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_status(cls, view: RunView) -> WatchView:
        """An empty view with the run's steps in declaration order."""
        return cls(
            view["run_id"], f"{view['workflow']} v{view['version']}", {name: _StepRow() for name in view["steps"]}
        )

    def apply(self, event: Event) -> None:
        """Fold one event into the view."""
        self.last_seq = event.seq
        if event.step is None:
            kind = event.type.removeprefix("run_")
            self.status = "running" if event.type in {EventType.RUN_STARTED, EventType.RUN_RESUMED} else kind
            return
        if event.type in {EventType.AGENT_TURN, EventType.TOOL_CALL}:
            self.apply_agent(event)
            return
        row = self.steps.setdefault(event.step, _StepRow())
        if event.type.startswith("item_"):
            # A map step's item: the row shows its progress, done of total (the total comes with the next status).
            row.items_done += event.type in {EventType.ITEM_SUCCEEDED, EventType.ITEM_FAILED}
            row.note = _items_note(row)
            return
        kind = event.type.removeprefix("step_")
        if kind == "started":
            row.status, row.attempt, row.started, row.finished = "running", event.attempt, event.ts, None
            row.note = ""
        elif kind == "retry":
            error = event.data.get("error", {})
            row.status = "queued"
            row.note = f"retry in {event.data.get('countdown_s', 0):.1f}s after {error.get('type', 'error')}"
        elif kind in {"queued", "lost", "waiting"}:
            row.status = "waiting" if kind == "waiting" else "queued"
            if kind == "lost":
                row.note = "worker lost: re-dispatched"
        else:
            row.status, row.finished = kind, event.ts
            if kind == "failed":
                row.note = str(event.data.get("message", ""))[:70]
            elif event.data.get("cached"):
                row.note = "reused stored result"
            if kind == "succeeded" and event.data.get("usage"):
                row.usage = dict(event.data["usage"])
                cost = event.data.get("cost_usd")
                row.cost = None if cost is None else float(cost)

    def apply_agent(self, event: Event) -> None:
        """Fold an agent step's turn or finished tool call into its conversation (the step's status is unchanged)."""
        assert event.step is not None
        data = event.data
        lines = self.talk.pop(event.step, [])
        if event.type == EventType.AGENT_TURN:
            text = " ".join(str(data.get("text", "")).split())
            lines.append(f"turn {data.get('turn', '?')}" + (f": {text}" if text else ""))
            lines.extend(f"  → {call.get('name', '?')} {call.get('input', '')}" for call in data.get("calls", []))
            # The turn's text is in its line now; the next turn streams afresh (after an llm_reset).
            self.texts.pop(event.step, None)
        else:
            mark = "✗" if data.get("error") else "←"
            lines.append(f"  {mark} {data.get('name', '?')}: {' '.join(str(data.get('result', '')).split())}")
        self.talk[event.step] = [_cut(line, _TALK_LINE_CHARS) for line in lines[-_TALK_LINES:]]

    def apply_delta(self, delta: Delta) -> None:
        """Fold a piece of a streaming step's text into the view (a reset starts the step's text again)."""
        name = delta.step if delta.index is None else f"{delta.step}[{delta.index}]"
        text = "" if delta.type == "llm_reset" else self.texts.pop(name, "") + delta.text
        self.texts[name] = text[-4 * _TEXT_TAIL_CHARS :]

    def refresh(self, view: RunView) -> None:
        """Take the run's totals (cost, tokens, budget, times) and map steps' item counts from a fresh status."""
        self.totals = view
        for name, step in view.get("steps", {}).items():
            items = step.get("items")
            row = self.steps.get(name)
            if items is not None and row is not None:
                row.items_total = items["total"]
                row.items_done = items["succeeded"] + items["failed"] + items["skipped"] + items["cancelled"]
                if row.status not in {"failed"}:
                    row.note = _items_note(row)

    def __rich__(self) -> Group:
        """The table and the totals line, computed when drawn (so a live run's duration keeps moving)."""
        totals = run_totals(self.totals, self.clock()) if self.totals is not None else ""
        parts: list[Table | Text] = [self.table()]
        if totals:
            parts.append(Text(totals))
        texts = dict(self.texts)
        for name, lines in list(self.talk.items())[-_TEXT_STEPS:]:
            parts.append(Text(f"{name} · conversation", style="bold magenta"))
            parts.extend(Text(line) for line in lines)
            if texts.get(name):
                parts.append(Text.assemble(("  … ", "bold cyan"), _tail(texts.pop(name))))
        for name, text in list(texts.items())[-_TEXT_STEPS:]:
            parts.append(Text.assemble((f"{name} ▸ ", "bold cyan"), _tail(text)))
        return Group(*parts)

    @property
    def done(self) -> int:
        """Steps that reached a final status."""
        return sum(1 for row in self.steps.values() if row.status in _FINAL)

    def table(self) -> Table:
        """One row per step: status, attempt, duration (so far, while it runs), cost, tokens, note."""
        table = Table(title=f"{self.workflow} · run {self.run_id} · [bold]{self.status}[/]", expand=False)
        for column in ("step", "status", "attempt", "duration", "cost", "tokens", "note"):
            table.add_column(column)
        for name, row in self.steps.items():
            duration = ""
            if row.started is not None and row.finished is not None:
                duration = f"{row.finished - row.started:.2f}s"
            elif row.started is not None and row.status == "running":
                duration = seconds(max(self.clock() - row.started, 0.0)) + "…"
            style = _STYLE.get(row.status, "")
            status = f"[{style}]{row.status}[/]" if style else row.status
            table.add_row(name, status, str(row.attempt or ""), duration, money(row.cost), tokens(row.usage), row.note)
        return table


def _tail(text: str) -> str:
    return " ".join(text.split())[-_TEXT_TAIL_CHARS:]


def _cut(line: str, limit: int) -> str:
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _items_note(row: _StepRow) -> str:
    total = "?" if row.items_total is None else str(row.items_total)
    return f"{row.items_done} of {total} items"


def watch_run(client: Client, run_id: str, console: Console | None = None) -> int:
    """Show the run live until it ends; returns the exit code (0 when it succeeded).

    Raises:
        RunNotFoundError: No such run.
    """
    console = console or Console()
    first = client.status(run_id)
    view = WatchView.from_status(first)
    view.refresh(first)
    read_at, stale = time.monotonic(), False
    progress = Progress(TextColumn("steps"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)
    task = progress.add_task("steps", total=len(view.steps))
    stop = threading.Event()
    follower = threading.Thread(target=_follow_deltas, args=(client, run_id, view, stop), daemon=True)
    follower.start()
    with Live(Group(progress, view), console=console, refresh_per_second=8, transient=False) as live:
        for event in client.stream(run_id):
            view.apply(event)
            stale = stale or event.type in _SETTLED
            if stale and time.monotonic() - read_at >= _TOTALS_EVERY_S:
                view.refresh(client.status(run_id))
                read_at, stale = time.monotonic(), False
            progress.update(task, completed=view.done)
            live.update(Group(progress, view))
        stop.set()
        follower.join(timeout=2)
        final = client.status(run_id)
        view.status = final["status"]
        view.refresh(final)
        live.update(Group(progress, view), refresh=True)
    colour = "green" if final["status"] == "succeeded" else "red"
    console.print(f"[bold {colour}]run {final['status']}[/]" + (f": {final['error']}" if final.get("error") else ""))
    return 0 if final["status"] == "succeeded" else 1


def _follow_deltas(client: Client, run_id: str, view: WatchView, stop: threading.Event) -> None:
    """Fold the run's streamed text into ``view`` until ``stop``: the text so far, then live deltas (pub/sub)."""
    redis_client = getattr(client.store, "client", None)
    if redis_client is None:
        return  # an in-memory store has no channel to follow
    received = DeltaFilter()
    try:
        with redis_client.pubsub(ignore_subscribe_messages=True) as pubsub:
            pubsub.subscribe(keys.deltas_channel(run_id))
            for delta in texts_so_far(redis_client, run_id):
                received.sent(delta)
                view.apply_delta(delta)
            while not stop.is_set():
                message = pubsub.get_message(timeout=0.2)
                decoded = Delta.decode(message["data"]) if message and message.get("type") == "message" else None
                needed = received.cut(decoded) if decoded is not None else None
                if needed is not None:
                    view.apply_delta(needed)
    except redis.RedisError:
        return  # the text is a nicety: the table goes on from the event stream
