"""The ``durapipe`` command: run pipelines, inspect and steer runs, start workers.

    durapipe run examples/blog.py:publish --input topic="AI safety"
    durapipe runs --status ERROR --since 1d
    durapipe show post-42 --follow
    durapipe fork post-42 --from 0.2
    durapipe worker examples/blog.py --executor-id worker-1
    durapipe sql install

Every command takes ``--database-url`` (default: ``DURAPIPE_DATABASE_URL``) and fails with
one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from . import _cli_follow, _cli_gates, _cli_schedules, _cli_views, _render, audit
from ._cli_common import (
    AppModule,
    AsJson,
    DbUrl,
    db_hint,
    err,
    find_app,
    guarded,
    load_module,
    load_target,
    out,
    print_json,
    unwrap_help,
)
from .engine.admin import Admin, database_url_or_env, parse_since
from .engine.app import App
from .engine.eventread import EventReader
from .engine.runs import RunHandle, RunStatus
from .engine.scope import belongs_to, refuse
from .errors import DurapipeError, OperatorError, UnknownRun
from .ir import Node
from .runview import wait_bars

cli = typer.Typer(name="durapipe", help="Run and operate durapipe pipelines.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
cli.add_typer(_cli_views.sql_cli, name="sql")
cli.add_typer(_cli_views.versions_cli, name="versions")
cli.add_typer(_cli_schedules.schedules_cli, name="schedules")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.print(f"durapipe {version('durapipe')}", highlight=False)
        raise typer.Exit()


@cli.callback()
def _quiet(_version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
           ) -> None:
    """Keep DBOS's own log lines (and tracebacks) out of the command's output."""
    os.environ.setdefault("DURAPIPE_LOG_LEVEL", "CRITICAL")
    logging.getLogger("dbos").setLevel(os.environ["DURAPIPE_LOG_LEVEL"])


def parse_inputs(pairs: list[str], input_file: Path | None) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if input_file is not None:
        try:
            loaded = json.loads(input_file.read_text())
        except (OSError, ValueError) as exc:
            raise OperatorError(f"--input-file {str(input_file)!r}: {exc}") from None
        if not isinstance(loaded, dict):
            raise OperatorError(f"--input-file {str(input_file)!r} must hold a JSON object")
        state.update(loaded)
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        if not eq or not key:
            raise OperatorError(f"--input {pair!r}: use key=value (value may be JSON)")
        try:
            state[key] = json.loads(raw)
        except ValueError:
            state[key] = raw
    return state


def _prepare(app: App, database_url: str | None, executor_id: str | None,
             take_over: bool = False) -> None:
    # Only a worker stays up: a one-shot command must not take over runs waiting for its shape.
    app.take_over_waiting = take_over
    if database_url:
        app.database_url = database_url_or_env(database_url)
    if executor_id:
        app.executor_id = executor_id


def _launch(app: App) -> None:
    try:
        app.launch()
    except DurapipeError:
        raise
    except Exception as exc:
        raise OperatorError(f"cannot launch app {app.name!r} on {audit.redact(app.database_url)}: "
                            f"{audit.first_line(exc)}") from None


_trees: dict[str, Any] = {}
Tokens = Annotated[bool, typer.Option("--tokens", help="Print each event as a line and the "
                                                        "model's text as it streams.")]


def _ended(admin: Admin, run_id: str) -> Any:
    """The run's tree once its end is recorded (just after its last event)."""
    while (tree := admin.tree(run_id)).run.status in ("PENDING", "ENQUEUED", "DELAYED"):
        time.sleep(0.05)
    return tree


def _live(admin: Admin, node: Node, run_id: str, fresh: bool) -> Any:
    """The live table of a run; its tree is read again only when a node ended."""
    if fresh or run_id not in _trees:
        _trees[run_id] = admin.tree(run_id)
    tree = _trees[run_id]
    return _render.live_table(node, tree, tree.run.status)


# -- commands ----------------------------------------------------------------------------

@cli.command()
@guarded
def run(
    target: Annotated[str, typer.Argument(help="MODULE:PIPELINE, e.g. examples/blog.py:publish")],
    input: Annotated[list[str] | None, typer.Option("--input", "-i", help="key=value (JSON or text)")] = None,
    input_file: Annotated[Path | None, typer.Option("--input-file", help="JSON object of inputs")] = None,
    run_id: Annotated[str | None, typer.Option("--run-id")] = None,
    executor_id: Annotated[str | None, typer.Option("--executor-id")] = None,
    database_url: DbUrl = None,
    as_json: AsJson = False,
    tokens: Tokens = False,
) -> None:
    """Run a pipeline to the end with a live view of its nodes, read from its event stream.

    Ctrl-C detaches: the run stays PENDING and the line printed says how to resume or
    follow it; a second Ctrl-C exits at once. The process records its runs under an
    executor id of its own (``run-<hex>``, or ``--executor-id``), so it never recovers a
    service's or a worker's runs; relaunching with that id resumes a detached run here.
    """
    os.environ.setdefault("DURAPIPE_LOG_LEVEL", "CRITICAL")
    app, pipeline = load_target(target)
    state = parse_inputs(input or [], input_file)
    _prepare(app, database_url, executor_id or f"run-{uuid.uuid4().hex[:8]}")
    app.stream_tokens = app.stream_tokens or tokens  # the agents run here stream their text
    _launch(app)
    handle = None
    try:
        handle = _existing(app, run_id) or pipeline.start(state, run_id=run_id)
        with Admin(app.database_url) as admin, EventReader(app.database_url) as reader:
            if not as_json:
                node, run = pipeline.node, handle.run_id
                _cli_follow.follow(reader, run, err, tokens=tokens, view=lambda flight, fresh:
                                   _cli_follow.grouped(_live(admin, node, run, fresh), flight))
                if not err.is_terminal:
                    err.print()
            while not handle.status().finished:  # its end is recorded just after its last event
                time.sleep(0.05)
            tree = admin.tree(handle.run_id)
    except KeyboardInterrupt:
        _detach(app, target, handle.run_id if handle is not None else None)
        raise typer.Exit(130) from None
    finally:
        app.shutdown()
    if as_json:
        print_json(tree.to_json())
    else:
        out.print(_render.run_tree(tree))
        if tree.run.status == RunStatus.SUCCESS.value:
            print_json(tree.output)
    if tree.run.status != RunStatus.SUCCESS.value:
        err.print(Text("error:", "red") + _render.literal(
            f" run {tree.run.run_id} {tree.run.status}: {tree.run.error or ''}"),
            highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _existing(app: App, run_id: str | None) -> RunHandle | None:
    """The run ``--run-id`` names when it exists already (e.g. detached): follow it, with the
    inputs it was started with; launching under its executor id has resumed it."""
    if run_id is None:
        return None
    try:
        return app.get_run(run_id)
    except UnknownRun:
        return None


def _detach(app: App, target: str, run_id: str | None) -> None:
    """Ctrl-C in ``durapipe run``: say where the run is; a second Ctrl-C exits at once."""
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    logging.getLogger("durapipe").setLevel(logging.ERROR)  # this line says what the stop leaves
    if run_id is None:
        err.print("interrupted before the run started", highlight=False)
        return
    executor = app.executor_id
    err.print(_render.literal(
        f"detached: run {run_id} is still PENDING; resume it with `durapipe run {target} "
        f"--run-id {run_id} --executor-id {executor}` (or `durapipe recover {executor}` while "
        f"a worker runs), follow it with `durapipe show {run_id} --follow`"),
        highlight=False, soft_wrap=True)


@cli.command()
@guarded
def runs(
    pipeline: Annotated[str | None, typer.Option("--pipeline", "-p")] = None,
    status: Annotated[str | None, typer.Option("--status", "-s", help="SUCCESS, ERROR, PENDING, ...")] = None,
    since: Annotated[str | None, typer.Option("--since", help="30m, 2h, 7d or an ISO date")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1)] = 20,
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Only this tenant's runs")] = None,
    database_url: DbUrl = None,
    as_json: AsJson = False,
) -> None:
    """List runs, newest first."""
    if status and status.upper() not in RunStatus.__members__:
        raise OperatorError(f"--status {status!r}: use one of {', '.join(RunStatus.__members__)}")
    with Admin(database_url) as admin:
        rows = admin.list_runs(pipeline=pipeline, status=status,
                               since=parse_since(since) if since else None, limit=limit,
                               tenant=tenant)
    if as_json:
        print_json([r.to_json() for r in rows])
    else:
        out.print(_render.runs_table(rows))


@cli.command()
@guarded
def show(
    run_id: Annotated[str, typer.Argument(help="the run id")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep the view live until the run ends.")] = False,
    ops: Annotated[bool, typer.Option("--ops", help="Also show DBOS's own operations (sleep, recv, ...).")] = False,
    database_url: DbUrl = None,
    as_json: AsJson = False,
    app_module: Annotated[str | None, typer.Option(
        "--app", help="Module defining the App: adds every node of the pipeline, the one in flight "
                      "shown running and those not reached pending")] = None,
    tokens: Tokens = False,
) -> None:
    """Show a run as a tree: nodes, child workflows, tasks, gates, timings, tokens, errors.

    ``--follow`` reads the run's event stream until it ends: the nodes in flight show
    while they run; ``--tokens`` prints each event as a line and the model's text as it
    arrives.
    """
    node = _pipeline_node(app_module, database_url, run_id) if app_module else None
    with Admin(database_url) as admin:
        tree = admin.tree(run_id)
        if follow and tree.run.status in ("PENDING", "ENQUEUED", "DELAYED"):
            with EventReader(admin.url) as reader:
                if not as_json:
                    def view(flight: Any, fresh: bool) -> Any:
                        if fresh:
                            _trees[run_id] = admin.tree(run_id)
                        return _cli_follow.grouped(
                            _show_view(node, _trees.get(run_id, tree), ops), flight)
                    _cli_follow.follow(reader, run_id, out, tokens=tokens, view=view)
                else:
                    for _ in reader.follow(run_id):
                        pass
            tree = _ended(admin, run_id)
            if not as_json and not tokens:
                return
    if as_json:
        print_json(tree.to_json())
    else:
        with Admin(database_url) as admin:
            logs = admin.step_logs(tree)
        if node is not None:
            out.print(_render.live_table(node, tree, tree.run.status))
        out.print(_render.run_tree(tree, ops, logs, db_hint(database_url)))
        now = int(time.time() * 1000)
        with EventReader(admin.url) as reader:
            waits = wait_bars(reader.waits(run_id), now)
        out.print(_render.text_timeline(tree, now, waits=waits))


def _pipeline_node(app_module: str, database_url: str | None, run_id: str) -> Node:
    """The IR of the pipeline a run was started from, from the module defining its App."""
    app = find_app(load_module(app_module))
    with Admin(database_url or app.database_url) as admin:
        pipeline = admin.run(run_id).pipeline
        rows = admin.client.list_workflows(workflow_ids=[run_id], load_input=False, load_output=False)
    if not rows or not belongs_to(app.dbos_name, rows[0]):  # --app names the run's own app only
        raise refuse(app.name, run_id)
    if pipeline not in app.pipelines:
        raise OperatorError(f"app {app.name!r} of {app_module!r} has no pipeline {pipeline!r} "
                            f"(registered: {sorted(app.pipelines)})")
    return app.registered(pipeline).node


def _show_view(node: Node | None, tree: Any, ops: bool) -> Any:
    from rich.console import Group

    view = _render.run_tree(tree, ops)
    return Group(_render.live_table(node, tree, tree.run.status), view) if node is not None else view


cli.command()(_cli_gates.approve)
cli.command()(_cli_gates.reject)
cli.command()(_cli_gates.pending)


@cli.command()
@guarded
def cancel(run_id: str, database_url: DbUrl = None,
           task: Annotated[str | None, typer.Option(
               "--task", help="cancel only this background task of the run (by name)")] = None,
           ) -> None:
    """Cancel a run and its child workflows, or with --task one background task of it."""
    with Admin(database_url) as admin:
        if task is not None:
            child = admin.cancel_task(run_id, task)
            out.print(_render.literal(f"cancelled task {task} of run {run_id} ({child})"),
                      highlight=False)
            return
        admin.cancel(run_id)
    out.print(_render.literal(f"cancelled run {run_id}"), highlight=False)


@cli.command()
@guarded
def resume(run_id: str, database_url: DbUrl = None,
           force: Annotated[bool, typer.Option(
               "--force", help="resume even if a live process is executing the run")] = False,
           ) -> None:
    """Resume a cancelled or stuck run from its last checkpoint (a live worker runs it)."""
    with Admin(database_url) as admin:
        admin.resume(run_id, force=force)
    out.print(_render.literal(f"resumed run {run_id}"), highlight=False)


@cli.command()
@guarded
def fork(run_id: str,
         from_node: Annotated[str, typer.Option("--from", help="node path (0.2) or node name")],
         database_url: DbUrl = None, as_json: AsJson = False) -> None:
    """Start a new run from a node of an old one, keeping the results recorded before it."""
    with Admin(database_url) as admin:
        step = admin.step_of(run_id, from_node)
        new_id = admin.fork(run_id, start_step=step)
    if as_json:
        print_json({"run_id": new_id, "forked_from": run_id, "start_step": step})
    else:
        out.print(_render.literal(f"forked run {run_id} from {from_node} (step {step}) as {new_id}"),
                  highlight=False)


@cli.command()
@guarded
def recover(executor_ids: Annotated[list[str], typer.Argument(help="executor ids of dead workers")],
            database_url: DbUrl = None,
            force: Annotated[bool, typer.Option(
                "--force", help="recover even an executor a live process holds")] = False,
            ) -> None:
    """Hand a dead worker's unfinished runs to the live workers (a live one is refused)."""
    with Admin(database_url) as admin:
        ids = admin.recover(executor_ids, force=force)
    out.print(_render.literal(f"re-queued {len(ids)} workflow(s) of {', '.join(executor_ids)}" +
                              (": " + ", ".join(ids) if ids else "")), highlight=False)


@cli.command()
@guarded
def worker(module: Annotated[str, typer.Argument(help="module or .py file defining the App")],
           executor_id: Annotated[str | None, typer.Option(
               "--executor-id", envvar="DURAPIPE_EXECUTOR_ID",
               help="unique per process; default: the App's, else a fresh worker-<hex>")] = None,
           database_url: DbUrl = None) -> None:
    """Run a long-lived worker: recover this executor's runs, then serve queues until stopped."""
    app = find_app(load_module(module))
    _prepare(app, database_url, executor_id or app.executor_id or f"worker-{uuid.uuid4().hex[:8]}",
             take_over=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    _launch(app)
    try:
        out.print(_render.literal(f"worker {app.executor_id} ready: app {app.name!r}, pipelines "
                                  f"{sorted(app.pipelines)}"), highlight=False)
        stop.wait()
    finally:
        app.shutdown()


cli.command("check-compat")(_cli_views.check_compat)
cli.command()(_cli_views.graph)


@cli.command()
@guarded
def ui(app_module: AppModule = None,
       host: Annotated[str, typer.Option("--host", help="interface to bind; 127.0.0.1 keeps it local")] = "127.0.0.1",
       port: Annotated[int, typer.Option("--port")] = 8233,
       database_url: DbUrl = None) -> None:
    """Serve the web console: runs, run pages with diagram and timeline, approvals.

    Changing a run needs a token: DURAPIPE_UI_TOKEN="alice:secret,bob:other" (or a bare shared
    token, whose holder types their name)."""
    if not app_module:
        raise OperatorError("give --app MODULE (or set DURAPIPE_APP): the module defining the App")
    try:
        import uvicorn

        from .web import create_console
    except ImportError as exc:
        raise OperatorError(f"durapipe ui needs FastAPI and uvicorn ({exc.name} is missing): "
                            "pip install 'durapipe[service]'") from None
    # The App's registry draws the pipelines; runs are read and gates answered from the
    # database alone, so the App is never launched here (nothing is recovered or run).
    app = find_app(load_module(app_module))
    url = database_url_or_env(database_url or app.database_url)
    with Admin(url):  # one line naming the database when it cannot be reached
        pass
    local = host in ("127.0.0.1", "localhost", "::1")
    console = create_console(app, database_url=url,
                             allowed_hosts=["127.0.0.1", "localhost", "[::1]"] if local else None)
    mode = "" if os.environ.get("DURAPIPE_UI_TOKEN") else " (read-only: set DURAPIPE_UI_TOKEN to allow changes)"
    out.print(_render.literal(f"durapipe console for app {app.name!r} on http://{host}:{port}/{mode}"),
              highlight=False, soft_wrap=True)
    uvicorn.run(console, host=host, port=port, log_level="warning")


unwrap_help(cli)


def main() -> None:
    """Entry point of the ``durapipe`` script."""
    cli()


if __name__ == "__main__":
    main()
