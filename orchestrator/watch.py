"""``orchestrator watch``: a live terminal view of a run, driven by its event stream."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.client import Client
from orchestrator.engine.events import Event, EventType
from orchestrator.engine.status import RunView

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


@dataclass
class _StepRow:
    status: str = "pending"
    attempt: int = 0
    started: float | None = None
    finished: float | None = None
    note: str = ""


@dataclass
class WatchView:
    """What the watch shows, folded from the run's events (a pure reducer, tested without a terminal)."""

    run_id: str
    workflow: str
    steps: dict[str, _StepRow] = field(default_factory=dict)
    status: str = "running"
    last_seq: int = 0

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
        row = self.steps.setdefault(event.step, _StepRow())
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

    @property
    def done(self) -> int:
        """Steps that reached a final status."""
        return sum(1 for row in self.steps.values() if row.status in _FINAL)

    def table(self) -> Table:
        """One row per step: status, attempt, duration, note."""
        table = Table(title=f"{self.workflow} · run {self.run_id} · [bold]{self.status}[/]", expand=False)
        for column in ("step", "status", "attempt", "duration", "note"):
            table.add_column(column)
        for name, row in self.steps.items():
            duration = ""
            if row.started is not None and row.finished is not None:
                duration = f"{row.finished - row.started:.2f}s"
            style = _STYLE.get(row.status, "")
            status = f"[{style}]{row.status}[/]" if style else row.status
            table.add_row(name, status, str(row.attempt or ""), duration, row.note)
        return table


def watch_run(client: Client, run_id: str, console: Console | None = None) -> int:
    """Show the run live until it ends; returns the exit code (0 when it succeeded).

    Raises:
        RunNotFoundError: No such run.
    """
    console = console or Console()
    view = WatchView.from_status(client.status(run_id))
    progress = Progress(TextColumn("steps"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)
    task = progress.add_task("steps", total=len(view.steps))
    with Live(Group(progress, view.table()), console=console, refresh_per_second=8, transient=False) as live:
        for event in client.stream(run_id):
            view.apply(event)
            progress.update(task, completed=view.done)
            live.update(Group(progress, view.table()))
    final = client.status(run_id)
    if final["status"] != view.status:
        view.status = final["status"]
    colour = "green" if final["status"] == "succeeded" else "red"
    console.print(f"[bold {colour}]run {final['status']}[/]" + (f": {final['error']}" if final.get("error") else ""))
    return 0 if final["status"] == "succeeded" else 1
