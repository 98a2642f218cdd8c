"""The ``durapipe`` commands about shapes and views rather than single runs: ``versions``
(with ``retire`` and ``export``), ``check-compat``, ``sql`` and ``graph``. ``cli.py``
registers them on the ``durapipe`` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from . import _render, audit
from ._cli_common import AsJson, DbUrl, find_app, guarded, load_module, load_target, out, print_json
from .engine import drain
from .engine.admin import Admin, database_url_or_env
from .errors import OperatorError

sql_cli = typer.Typer(help="The audit SQL views (schema durapipe).", no_args_is_help=True)
versions_cli = typer.Typer(help="Pipeline shapes and the runs in flight on each (the drain report).",
                           invoke_without_command=True)


@versions_cli.callback()
@guarded
def versions(ctx: typer.Context, database_url: DbUrl = None, as_json: AsJson = False) -> None:
    """Every pipeline shape seen, with its unfinished runs: running, at a gate, sleeping, and
    waiting for a worker with their shape; then the waiting runs and why."""
    if ctx.invoked_subcommand is not None:
        return
    shapes, waiting = drain.drain_report(database_url_or_env(database_url))
    if as_json:
        print_json({"shapes": [s.to_json() for s in shapes],
                     "waiting": [w.__dict__ for w in waiting]})
        return
    out.print(_render.shapes_table(shapes))
    for w in waiting:
        out.print(_render.literal(f"waiting: run {w.run_id} ({w.pipeline}, shape {w.shape}) at "
                                  f"node {w.waiting_node or '?'}: {w.reason or ''}"), highlight=False,
                  soft_wrap=True)


@versions_cli.command("retire")
@guarded
def versions_retire(
    shape: Annotated[str, typer.Argument(help="the shape whose waiting runs to give up")],
    cancel_runs: Annotated[bool, typer.Option("--cancel", help="Cancel them (required).")] = False,
    database_url: DbUrl = None,
) -> None:
    """Cancel the runs waiting for a worker with SHAPE: nothing fails them otherwise."""
    url = database_url_or_env(database_url)
    ids = drain.waiting_runs_of(url, shape)
    if not cancel_runs:
        raise OperatorError(f"{len(ids)} run(s) wait for shape {shape}: add --cancel to cancel "
                            "them, or start a worker with that shape to finish them")
    with Admin(url) as admin:
        for run_id in ids:
            admin.cancel(run_id)
    drain.forget_waiting(url, ids)
    out.print(_render.literal(f"cancelled {len(ids)} run(s) waiting for shape {shape}" +
                              (": " + ", ".join(ids) if ids else "")), highlight=False)


@versions_cli.command("export")
@guarded
def versions_export(module: Annotated[str, typer.Argument(help="module or .py file defining the App")]) -> None:
    """Print the shapes and manifests of a module's pipelines (for check-compat --manifest)."""
    print_json(drain.export_manifests(find_app(load_module(module))))


@guarded
def check_compat(
    module: Annotated[str, typer.Argument(help="module or .py file of the code to deploy")],
    manifest: Annotated[Path | None, typer.Option(
        "--manifest", help="`durapipe versions export` of the code deployed now, instead of the database")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 when a run would wait.")] = False,
    database_url: DbUrl = None,
    as_json: AsJson = False,
) -> None:
    """Before a deploy: which unfinished runs the new code would continue, and which it
    would leave waiting for a worker with their shape."""
    app = find_app(load_module(module))
    if manifest is not None:
        try:
            recorded = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise OperatorError(f"--manifest {str(manifest)!r}: {exc}") from None
        found = drain.check_manifests(recorded, app)
        if as_json:
            print_json(found)
        for r in found if not as_json else ():
            out.print(_render.literal(_render.manifest_verdict(r)), highlight=False, soft_wrap=True)
        if strict and any(r["wait_from"] for r in found):
            raise typer.Exit(1)
        return
    rows = drain.check_compat(database_url_or_env(database_url or app.database_url), app)
    waiting = [r for r in rows if r["verdict"] == "wait"]
    if as_json:
        print_json(rows)
    else:
        for r in rows:
            out.print(_render.literal(_render.run_verdict(r)), highlight=False, soft_wrap=True)
        out.print(_render.literal(f"{len(rows) - len(waiting)} run(s) would continue, "
                                  f"{len(waiting)} would wait"), highlight=False)
    if strict and waiting:
        raise typer.Exit(1)


@sql_cli.command("print")
def sql_print() -> None:
    """Print the SQL of the audit views."""
    out.file.write(audit.keys_sql() + "\n" + audit.views_sql() + "\n" + audit.versions_sql())


@sql_cli.command("install")
@guarded
def sql_install(database_url: DbUrl = None) -> None:
    """Create or replace the audit views in the Postgres database."""
    url = database_url_or_env(database_url)
    audit.install_views(url)
    out.print(f"installed views durapipe.{{{', '.join(audit.VIEWS)}}}")


@guarded
def graph(target: Annotated[str, typer.Argument(help="MODULE:PIPELINE, e.g. examples/demo.py:publish")],
          fmt: Annotated[str, typer.Option("--format", help="mermaid (text), svg or png")] = "mermaid",
          output: Annotated[Path | None, typer.Option("--output", "-o", help="file for svg/png")] = None,
          ) -> None:
    """Draw a pipeline: a Mermaid flowchart, or an SVG/PNG image (Mermaid's mmdc when it is
    installed; else durapipe's own SVG, and PNG through a headless Chromium)."""
    import shutil

    from . import diagram, diagram_svg

    _, pipeline = load_target(target)
    text = pipeline.mermaid()
    if fmt == "mermaid":
        out.file.write(text + "\n")
        return
    if fmt not in ("svg", "png"):
        raise OperatorError(f"--format {fmt!r}: use mermaid, svg or png")
    dest = output or Path(f"{pipeline.name}.{fmt}")
    if shutil.which("mmdc"):
        diagram.render(text, fmt, str(dest))
        how = "Mermaid's mmdc"
    elif fmt == "svg":
        dest.write_text(diagram_svg.svg(pipeline.node, title=pipeline.name))
        how = "durapipe's SVG drawing (install mmdc for Mermaid's layout)"
    else:
        diagram_svg.write_png(diagram_svg.svg(pipeline.node, title=pipeline.name), str(dest))
        how = "durapipe's SVG drawing, photographed by headless Chromium"
    out.print(_render.literal(f"wrote {dest} with {how}"), highlight=False)
