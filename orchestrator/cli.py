"""The ``orchestrator`` command: validate, submit, status, worker, demo.

Every error a user can cause ends in one line on stderr naming the problem and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import redis
from rich.console import Console

from orchestrator.consumers import NoWorkerWarning
from orchestrator.definition.files import load_workflow_file
from orchestrator.definition.inputs import parse_cli_inputs
from orchestrator.definition.modules import import_local_modules
from orchestrator.definition.registry import functions, import_modules, workflows
from orchestrator.definition.spec import WorkflowSpec
from orchestrator.definition.validation import check_workflow
from orchestrator.domain import RunStatus
from orchestrator.engine.status import MAX_LIST_OFFSET
from orchestrator.errors import OrchestratorError, StoreUnavailableError
from orchestrator.infra.redis_url import RedisUrlError, is_memory_url, redact_url, require_shared_store
from orchestrator.infra.settings import Settings
from orchestrator.principals import is_reserved, reserved_message
from orchestrator.state.items import MAX_ITEM_PAGE

if TYPE_CHECKING:
    from orchestrator.engine.status import RunView

EXIT_FAILED_RUN = 1
EXIT_ERROR = 2
PIPED_WIDTH = 200
"""Columns tables take when the output is not a terminal (rich would take 80, folding every run id)."""
DISTRIBUTION = "llm-orchestrator"
"""The package whose version ``orchestrator --version`` prints."""


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _settings() -> Settings:
    try:
        settings = Settings.from_env()
        import_modules(settings.imports)
    except (ValueError, OrchestratorError) as exc:
        _fail(str(exc))
    return settings


def _shared(settings: Settings, what: str) -> None:
    """Fail in one line when ``what`` is a process of its own and ``REDIS_URL`` is ``memory://``."""
    try:
        require_shared_store(settings.redis_url, what)
    except RedisUrlError as exc:
        _fail(str(exc))


def _client(settings: Settings, *, runs_here: bool = False) -> Any:
    """A client; with ``memory://`` only for a command that runs the run itself to its end (``runs_here``)."""
    from orchestrator.client import Client

    if is_memory_url(settings.redis_url) and not runs_here:
        _fail(
            "REDIS_URL=memory:// keeps a run inside the command that submitted it, so no other command sees it: "
            "use `orchestrator submit --wait` (or --watch), or set REDIS_URL to a Redis server"
        )

    try:
        # A cluster client reads the slot map when it is built: one that finds no seed node fails here, the same way.
        client = Client(settings)
        client.store.ping()
    except StoreUnavailableError:
        where = redact_url(settings.redis_url).rsplit("@", 1)[-1]
        _fail(f"Redis at {where} does not answer (set REDIS_URL to a reachable Redis)")
    return client


def _console() -> Console:
    """A console for tables: the terminal's width, or wide enough that piped rows stay whole (run ids unfolded)."""
    return Console() if sys.stdout.isatty() else Console(width=PIPED_WIDTH)


def _load(file: str) -> tuple[WorkflowSpec, list[str]]:
    """A workflow file (see ``_load_file``), or the name of a registered workflow when no such file exists."""
    if not Path(file).exists() and "/" not in file and not file.endswith((".yaml", ".yml", ".json")):
        return workflows.get(file), []
    return _load_file(file)


def _load_file(file: str) -> tuple[WorkflowSpec, list[str]]:
    """A workflow file, and the modules under the current directory imported because they register its functions.

    The file is the user's and so is the directory: importing a module of it that the file names is what
    ``ORCH_IMPORTS`` would do. The API never does this (see the security page).
    """
    spec = load_workflow_file(file)
    return spec, import_local_modules(spec, functions)


def _note_imports(modules: list[str]) -> None:
    """Say which modules were imported for the file: workers do not, unless ``ORCH_IMPORTS`` lists them."""
    for module in modules:
        click.echo(f"note: imported {module} from {Path.cwd()}; workers need ORCH_IMPORTS={module} too", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name=DISTRIBUTION, prog_name="orchestrator", message="%(prog)s %(version)s")
def main() -> None:
    """A distributed orchestrator for multi-step LLM workflows on Celery and Redis."""


@main.command()
@click.argument("file")
def validate(file: str) -> None:
    """Check a workflow file; exit 0 when it is valid."""
    _settings()
    try:
        spec, imported = _load_file(file)
        check_workflow(spec)
    except OrchestratorError as exc:
        _fail(str(exc), 1)
    click.echo(f"ok: {spec.name} version {spec.version}, {len(spec.steps)} steps, definition {spec.definition_hash}")
    _note_imports(imported)


@main.command()
@click.argument("file")
@click.option("--input", "inputs", multiple=True, metavar="KEY=VALUE", help="A workflow input (repeatable).")
@click.option("--idempotency-key", default=None, help="Submitting again with the same key returns the same run.")
@click.option("--wait", is_flag=True, help="Wait for the run to end; exit non-zero unless it succeeded.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after this many seconds.")
@click.option("--watch", "live", is_flag=True, help="Show live progress until the run ends (exit code as --wait).")
def submit(
    *,
    file: str,
    inputs: tuple[str, ...],
    idempotency_key: str | None,
    wait: bool,
    as_json: bool,
    timeout: float | None,
    live: bool,
) -> None:
    """Start a run of a workflow file (or a registered workflow's name); prints the run id."""
    settings = _settings()
    try:
        spec, imported = _load(file)
        values = parse_cli_inputs(spec, inputs)
        client = _client(settings, runs_here=wait or live)
        run_id = client.submit(spec, values, idempotency_key=idempotency_key)
    except OrchestratorError as exc:
        _fail(str(exc), 1)
    if not is_memory_url(settings.redis_url):
        _note_imports(imported)
    if live:
        from orchestrator.watch import watch_run

        click.echo(run_id)
        sys.exit(watch_run(client, run_id))
    if not wait:
        click.echo(json.dumps({"run_id": run_id}) if as_json else run_id)
        return
    try:
        with NoWorkerWarning(client, spec, run_id, say=lambda line: click.echo(line, err=True)):
            view = client.wait(run_id, timeout=timeout)
    except TimeoutError as exc:
        _fail(str(exc), EXIT_FAILED_RUN)
    except OrchestratorError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps(view))
    else:
        click.echo(run_id)
        _print_status(view)
    sys.exit(0 if view["status"] == "succeeded" else EXIT_FAILED_RUN)


@main.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the status JSON.")
@click.option("--step", default=None, help="List the items of this map step instead (one page).")
@click.option("--offset", default=0, type=click.IntRange(0, 1_000_000), help="With --step: skip this many items.")
@click.option("--limit", default=100, type=click.IntRange(1, MAX_ITEM_PAGE), help="With --step: at most this many.")
def status(run_id: str, as_json: bool, step: str | None, offset: int, limit: int) -> None:
    """Show a run's status, or with --step one page of a map step's items."""
    client = _client(_settings())
    if step is not None:
        _print_items(client, run_id, step, (offset, limit), as_json=as_json)
        return
    try:
        view = client.status(run_id)
    except OrchestratorError as exc:
        _fail(str(exc), 1)
    except redis.RedisError as exc:
        _fail(f"Redis: {exc}")
    if as_json:
        click.echo(json.dumps(view))
    else:
        _print_status(view)


def _print_items(client: Any, run_id: str, step: str, page_at: tuple[int, int], *, as_json: bool) -> None:
    offset, limit = page_at
    try:
        page = client.items(run_id, step, offset=offset, limit=limit)
    except OrchestratorError as exc:
        _fail(str(exc), 1)
    except redis.RedisError as exc:
        _fail(f"Redis: {exc}")
    if as_json:
        click.echo(json.dumps(page))
        return
    shown = len(page["items"])
    click.echo(f"{step}: items {offset}-{offset + shown - 1 if shown else offset} of {page['total']}")
    for record in page["items"]:
        error = f"  {record['error'].get('message', '')}" if record["error"] else ""
        item = json.dumps(record["item"])[:60]
        click.echo(f"{record['index']:>6}  {record['status']:<10} {record['attempts']}  {item}{error}")


@main.command()
@click.argument("run_id")
def watch(run_id: str) -> None:
    """Show a run's progress live (a bar and a row per step); exit 0 when it succeeds."""
    from orchestrator.watch import watch_run

    client = _client(_settings())
    try:
        code = watch_run(client, run_id, console=_console())
    except OrchestratorError as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        _fail("stopped watching (the run goes on)", 130)
    sys.exit(code)


@main.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def cancel(run_id: str, as_json: bool) -> None:
    """Cancel a run: no step starts after this returns; finished outputs are kept. Harmless twice."""
    client = _client(_settings())
    try:
        outcome = client.cancel(run_id)
    except OrchestratorError as exc:
        _fail(str(exc), 1)
    click.echo(json.dumps(outcome) if as_json else outcome["message"])


@main.command()
@click.argument("run_id")
@click.option("--from", "from_step", default=None, metavar="STEP", help="Re-run this step and its dependents too.")
@click.option("--wait", is_flag=True, help="Wait for the run to end; exit non-zero unless it succeeded.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--allow-definition-change",
    "allow_change",
    is_flag=True,
    help="Move the run to the workflow version's changed definition; unchanged steps keep their results.",
)
def resume(run_id: str, from_step: str | None, wait: bool, as_json: bool, allow_change: bool) -> None:
    """Re-run a failed, cancelled or timed-out run from its checkpoint."""
    client = _client(_settings())
    try:
        generation = client.resume(run_id, from_step=from_step, allow_definition_change=allow_change)
    except OrchestratorError as exc:
        _fail(str(exc), 1)
    if not wait:
        message = {"run_id": run_id, "generation": int(generation)}
        click.echo(json.dumps(message) if as_json else f"resumed run {run_id} (generation {generation})")
        return
    view = client.wait(run_id)
    if as_json:
        click.echo(json.dumps(view))
    else:
        _print_status(view)
    sys.exit(0 if view["status"] == "succeeded" else EXIT_FAILED_RUN)


def _decide(decision: str, run_id: str, step: str, who: str, comment: str, *, item: int | None) -> None:
    if is_reserved(who):
        _fail(f"--as: {reserved_message(who)}")
    client = _client(_settings())
    decide = client.approve if decision == "approve" else client.reject
    try:
        record = decide(run_id, step, by=who, comment=comment, item=item)
    except OrchestratorError as exc:
        _fail(str(exc), 1)
    verb = "approved" if record["approved"] else "rejected"
    name = step if item is None else f"{step}[{item}]"
    click.echo(f"{name}: {verb} by {record['by']}" + (f" ({comment})" if comment else ""))


_ITEM_HELP = "The item to decide, on an approval map step (for_each): one decision per item."


@main.command()
@click.argument("run_id")
@click.argument("step")
@click.option("--as", "who", required=True, help="Who decides; must be one of the step's approvers.")
@click.option("--comment", default="", help="Why (kept in the audit trail).")
@click.option("--item", type=click.IntRange(min=0), default=None, help=_ITEM_HELP)
def approve(run_id: str, step: str, who: str, comment: str, item: int | None) -> None:
    """Approve a waiting approval step."""
    _decide("approve", run_id, step, who, comment, item=item)


@main.command()
@click.argument("run_id")
@click.argument("step")
@click.option("--as", "who", required=True, help="Who decides; must be one of the step's approvers.")
@click.option("--comment", default="", help="Why (kept in the audit trail).")
@click.option("--item", type=click.IntRange(min=0), default=None, help=_ITEM_HELP)
def reject(run_id: str, step: str, who: str, comment: str, item: int | None) -> None:
    """Reject a waiting approval step."""
    _decide("reject", run_id, step, who, comment, item=item)


@main.command("runs")
@click.option("--status", type=click.Choice([s.value for s in RunStatus]), help="Only runs with this status.")
@click.option("--workflow", help="Only runs of this workflow.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000), help="At most this many runs.")
@click.option(
    "--offset", default=0, show_default=True, type=click.IntRange(0, MAX_LIST_OFFSET), help="Skip this many runs."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def list_runs(*, status: str | None, workflow: str | None, limit: int, offset: int, as_json: bool) -> None:
    """Recent runs, newest first, with duration, cost, tokens and error (like ``GET /runs``)."""
    from orchestrator.tables import runs_table

    page = _client(_settings()).runs_page(status=status, workflow=workflow, limit=limit, offset=offset)
    if as_json:
        click.echo(json.dumps(page["runs"]))
        return
    first = offset + 1 if page["runs"] else offset
    _console().print(runs_table(page["runs"], title=f"runs {first} to {offset + len(page['runs'])}"))
    if page["next_offset"] is not None:
        click.echo(f"more: orchestrator runs --offset {page['next_offset']} --limit {limit}")


@main.command("workflows")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--scan", default=10_000, show_default=True, help="How many of the newest runs to count.")
def list_workflows(as_json: bool, scan: int) -> None:
    """Workflows by name and version, registered here or submitted (as files), with the runs in flight on each."""
    from orchestrator.tables import workflow_rows, workflows_table

    client = _client(_settings())
    in_flight: dict[tuple[str, int], int] = {}
    for row in client.store.run_summaries(client.store.list_run_ids(limit=scan)):
        if row["status"] in {"pending", "running", "waiting"}:
            key = (row["workflow"], int(row["version"] or 1))
            in_flight[key] = in_flight.get(key, 0) + 1
    rows = workflow_rows(workflows.all(), client.store.submitted_definitions(), in_flight)
    if as_json:
        click.echo(json.dumps(rows))
        return
    _console().print(workflows_table(rows))


def _print_status(view: RunView) -> None:
    from orchestrator.tables import run_links, run_totals, step_table

    console = _console()
    console.print(step_table(view))
    for line in run_links(view):
        console.print(line)
    totals = run_totals(view, time.time())
    if totals:
        console.print(totals)
    if view.get("error"):
        console.print(f"[red]{view['error']}[/]")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(celery_args: tuple[str, ...]) -> None:
    """Start a worker; options are Celery's (``orchestrator worker -Q llm -P threads -c 100``).

    It becomes ``celery -A workers worker``, so every pool works (Celery monkeypatches gevent and eventlet itself,
    before anything is imported) and the worker's settings come from the same environment.
    """
    settings = _settings()
    _shared(settings, "a worker")
    argv = worker_argv(celery_args, settings)
    os.execv(argv[0], argv)


def worker_argv(celery_args: Sequence[str], settings: Settings) -> list[str]:
    """The ``celery -A workers worker`` command line for ``celery_args``, on both step queues unless they say."""
    args = list(celery_args)
    if not any(a in {"-Q", "--queues"} or a.startswith(("--queues=", "-Q")) for a in args):
        args += ["--queues", f"{settings.llm_queue},{settings.cpu_queue}"]
    return [sys.executable, "-m", "celery", "-A", "workers", "worker", *args]


@main.command()
@click.option("--topic", default="How Celery chords work", help="The demo pipeline's topic.")
@click.option("--workers", "count", default=2, show_default=True, help="Worker processes to start.")
@click.option("--concurrency", default=4, show_default=True, help="Slots per worker.")
def demo(topic: str, count: int, concurrency: int) -> None:
    """Run the content pipeline end to end on worker processes this command starts and stops."""
    from orchestrator.dev.demo import run_demo

    settings = _settings()
    _shared(settings, "the demo's worker processes")
    try:
        code = run_demo(settings, topic=topic, workers=count, concurrency=concurrency, console=Console())
    except OrchestratorError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; workers and the embedded Redis were stopped", 130)
    sys.exit(code)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback unless tokens).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
def api(host: str, port: int) -> None:
    """Serve the HTTP API; ORCH_API_TOKENS holds its tokens (without them it serves loopback only)."""
    settings = _settings()
    _shared(settings, "the API server")
    from orchestrator.api.server import serve

    try:
        serve(settings, host=host, port=port)
    except OrchestratorError as exc:
        _fail(str(exc))


@main.command()
@click.option(
    "--heartbeat-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Touch this file after every sweep that reached Redis (for a container healthcheck).",
)
def sweeper(heartbeat_file: Path | None) -> None:
    """Only sweep: re-send lost steps, fire deadlines and approval timeouts (workers sweep too, one at a time)."""
    settings = _settings()
    _shared(settings, "the sweeper service")
    from orchestrator.engine.sweep_service import serve

    try:
        serve(settings, heartbeat=heartbeat_file)
    except OrchestratorError as exc:
        _fail(str(exc))


@main.command("offline-api")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8081, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option(
    "--rpm",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Answer 429 beyond this many requests a minute, as the service does (0: no limit).",
)
def offline_api(host: str, port: int, rpm: int) -> None:
    """Serve the offline provider as a local Messages API (point workers at it with ANTHROPIC_BASE_URL)."""
    from orchestrator.dev.offline_server import OfflineAPIServer

    server = OfflineAPIServer(host, port, rpm=rpm)
    click.echo(f"offline Messages API on {server.base_url} (rpm limit: {rpm or 'none'}); GET /stats for counts")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
